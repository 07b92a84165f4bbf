"""A reward plugin: plain functions with TRL's signature, named from a recipe by file path.

    dllm-rl train examples/reward_plugin.yaml          # GRPO on Countdown with these two rewards (CPU, ~1 minute)

The recipe names them as `examples/reward_plugin.py:<function>` (an installed module's `module:function`
and an entry point of group `dllm_rl.rewards` work too). Dataset columns arrive as keyword arguments, one value
per completion (Countdown rows carry `numbers` and `target`); return one float per completion, or None where
a reward does not apply (it is then left out of the weighted sum, as in TRL).

>>> closeness(["p"], ["3*5"], target=[16])
[0.5]
>>> short([[{"role": "user", "content": "p"}]], [[{"role": "assistant", "content": "1+2"}]])
[0.875]
"""

import re
import warnings


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def closeness(prompts, completions, target, **kwargs):
    """1 / (1 + |value - target|) for an arithmetic expression of at most 200 characters; 0 when it is longer or
    does not evaluate (a reward that raises stops the run, so every failure of a model's text is caught here).

    >>> closeness(["p"] * 6, ["12(18+8)", "9**9**9", "1/0", "()", "-" * 3000 + "1", "-" * 150 + "16"], target=[16] * 6)
    [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    """
    out = []
    for c, t in zip(completions, target):
        expr = _text(c).strip()
        # no powers (9**9**9 would never finish) and nothing long (Python's parser recurses on nested signs)
        if len(expr) > 200 or not re.fullmatch(r"[\d+\-*/() ]+", expr) or "**" in expr:
            out.append(0.0)
            continue
        try:
            with warnings.catch_warnings():  # 12(18+8): Python warns "'int' object is not callable" as it compiles
                warnings.simplefilter("ignore", SyntaxWarning)
                value = eval(expr, {"__builtins__": {}})  # digits and operators only (checked above)
            out.append(1.0 / (1.0 + abs(float(value) - t)))
        except (SyntaxError, TypeError, ValueError, ArithmeticError, RecursionError, MemoryError):
            out.append(0.0)  # 12(18+8) calls an int; 1/0; a value too large; a parser that gives up
    return out


def short(prompts, completions, **kwargs):
    """A small bonus for short answers: 1 - length / 24."""
    return [max(0.0, 1.0 - len(_text(c)) / 24) for c in completions]
