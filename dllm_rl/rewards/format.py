"""Format rewards: does the completion use the reasoning/answer tags (or a fenced code block) as asked?

The tag rules are d1's (arXiv:2504.12216, `diffu-grpo/reward_func.py`), which took them from Will Brown's
GRPO demo, and keep d1's values so that d1's recipes carry over with weight 1.0:

- `format_strict` (0.5): the whole completion is
  `<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n` (one more trailing newline is
  tolerated, as d1's `\\n$` does);
- `format_soft` (0.5): the completion *starts* with `<reasoning>...</reasoning>`, then optional whitespace,
  then `<answer>...</answer>`; anything may follow;
- `xml_count` (at most 0.5): 0.125 for each of `<reasoning>\\n`, `\\n</reasoning>\\n`, `\\n<answer>\\n`,
  `\\n</answer>` occurring exactly once, minus 0.001 per character of trailing text after the answer. Kept
  exactly, quirk included: the third term subtracts 0.001 per character after the last
  `\\n</answer>\\n`, which is the *whole* completion when the answer closes without a newline;
- `format_think`: `format_strict` with `<think>` in place of `<reasoning>` (R1-style prompts). Every tag
  reward also takes `tag="think"` (or any name) as a recipe kwarg.

`code_format` follows DiffuCoder (arXiv:2506.20639): 1.0 when the completion ends with its only ```python
block (prose may precede it) and the code parses, 0.5 when it does not parse, else 0. Departure: DiffuCoder
requires exactly `\\n` after the closing fence; any trailing whitespace (or none) is accepted here, as
completions often lose their last newline to EOS trimming.
"""

from __future__ import annotations

import ast
import re

from ._text import completion_text


def _tags(tag: str) -> str:
    return re.escape(tag)


def strict_format_reward(prompts, completions, tag: str = "reasoning", **kwargs) -> list[float]:
    """0.5 when the completion is exactly `<tag>` block, `<answer>` block, newline (d1's strict rule).

    >>> strict_format_reward(["p"] * 3, ["<reasoning>\\nx\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n",
    ...                                  "<reasoning>x</reasoning><answer>4</answer>",
    ...                                  "<reasoning>\\nx\\n</reasoning>\\n<answer>\\n4\\n</answer>"])
    [0.5, 0.0, 0.0]
    """
    t = _tags(tag)
    pattern = re.compile(rf"<{t}>\n.*?\n</{t}>\n<answer>\n.*?\n</answer>\n\n?", re.S)
    return [0.5 if pattern.fullmatch(completion_text(c)) else 0.0 for c in completions]


def soft_format_reward(prompts, completions, tag: str = "reasoning", **kwargs) -> list[float]:
    """0.5 when the completion starts with a `<tag>` block followed by an `<answer>` block (d1's soft rule).

    >>> soft_format_reward(["p"] * 3, ["<reasoning>x</reasoning> <answer>4</answer> bye",
    ...                                "Sure! <reasoning>x</reasoning><answer>4</answer>",
    ...                                "<answer>4</answer>"])
    [0.5, 0.0, 0.0]
    """
    t = _tags(tag)
    pattern = re.compile(rf"<{t}>.*?</{t}>\s*<answer>.*?</answer>", re.S)
    return [0.5 if pattern.match(completion_text(c)) else 0.0 for c in completions]


def count_xml(text: str, tag: str = "reasoning") -> float:
    """d1's partial credit for the four tags, each expected once, less 0.001 per trailing character.

    >>> count_xml("<reasoning>\\nx\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n")
    0.5
    >>> round(count_xml("<reasoning>\\nx\\n</reasoning>\\n<answer>\\n4\\n</answer>\\nbye"), 3)
    0.494
    >>> round(count_xml("<reasoning>\\nx\\n</reasoning>\\n<answer>\\n4\\n</answer>"), 3)  # 47 chars off
    0.454
    >>> count_xml("no tags at all")
    0.0
    """
    score = 0.0
    if text.count(f"<{tag}>\n") == 1:
        score += 0.125
    if text.count(f"\n</{tag}>\n") == 1:
        score += 0.125
    if text.count("\n<answer>\n") == 1:
        score += 0.125 - 0.001 * len(text.split("\n</answer>\n")[-1])
    if text.count("\n</answer>") == 1:
        score += 0.125 - 0.001 * (len(text.split("\n</answer>")[-1]) - 1)
    return score


def xml_count_reward(prompts, completions, tag: str = "reasoning", **kwargs) -> list[float]:
    """`count_xml` of each completion (d1's `xmlcount`).

    >>> xml_count_reward(["p"], [[{"role": "assistant", "content": "<reasoning>\\nx\\n</reasoning>\\n"}]])
    [0.25]
    """
    return [count_xml(completion_text(c), tag) for c in completions]


def think_format_reward(prompts, completions, **kwargs) -> list[float]:
    """`strict_format_reward` with `<think>` tags.

    >>> think_format_reward(["p"] * 2, ["<think>\\nx\\n</think>\\n<answer>\\n4\\n</answer>\\n",
    ...                                 "<reasoning>\\nx\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n"])
    [0.5, 0.0]
    """
    kwargs.pop("tag", None)
    return strict_format_reward(prompts, completions, tag="think", **kwargs)


_CODE_LAST = re.compile(r"(?:(?!```).)*```python\n((?:(?!```).)*)```\s*", re.S)


def code_format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for prose then one ```python block that ends the completion and parses; 0.5 if it does not parse.

    >>> code_format_reward(["p"] * 4, ["Here:\\n```python\\ndef f():\\n    return 1\\n```\\n",
    ...                                "```python\\ndef f(:\\n```", "```python\\nx=1\\n```\\nExplained.",
    ...                                "x = 1"])
    [1.0, 0.5, 0.0, 0.0]
    """
    out = []
    for c in completions:
        m = _CODE_LAST.fullmatch(completion_text(c))
        if m is None:
            out.append(0.0)
            continue
        try:
            ast.parse(m.group(1))
            out.append(1.0)
        except (SyntaxError, ValueError):
            out.append(0.5)
    return out
