"""Math answer rewards: GSM8K final numbers and MATH boxed answers, compared by math-verify (symbolic
equivalence: 1/2 == 0.5 == \\frac{1}{2}), not by string matching."""

from __future__ import annotations

import re
import threading

from ._text import completion_text


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} (balanced braces), or None.

    >>> last_boxed(r"so \boxed{\frac{1}{2}} and \boxed{3}")
    '3'
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")  # prose inside the tags; LaTeX commands (\frac) do not count
_NUMBER = re.compile(r"(?<![\w.)\]}])-?\d[\d,]*\.?\d*")  # a sign only where no operand precedes it (10-5: 10, 5)
_GROUPED = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")  # 1,000 or 12,345.5


def final_answer(text: str) -> str:
    r"""The answer a completion commits to: the content of its <answer> tags, \boxed{}, '#### x', or the last number.

    Inside <answer> tags the whole content is the answer (a fraction, root or tuple is kept whole, for math-verify
    to compare), unless it is prose: then, as outside tags, the last number (a minus sign counts only where no
    operand precedes it).

    >>> final_answer("<answer> 72 </answer>"), final_answer(r"<answer>\frac{3}{4}</answer>")
    ('72', '\\frac{3}{4}')
    >>> final_answer("<answer>so it is 72 clips</answer>"), final_answer("<answer>1,000</answer>")
    ('72', '1000')
    >>> final_answer("Natalia sold 48 + 24 = 72 clips.")
    '72'
    >>> final_answer("#### 1,000"), final_answer("the answer is \u22125")
    ('1000', '-5')
    """
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    tagged = re.search(r"<answer>(.*?)</answer>", text, re.S)
    if tagged:
        text = tagged.group(1).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if tagged and "####" not in text and not _WORD.search(text):
        return text.replace(",", "") if _GROUPED.fullmatch(text) else text
    m = re.search(r"####\s*(.+)", text)
    if m:
        text = m.group(1)
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else text.strip()


def answers_match(predicted: str, reference: str) -> bool:
    r"""Symbolic equivalence via math-verify.

    >>> answers_match("0.5", "\\frac{1}{2}"), answers_match("3", "4")
    (True, False)
    """
    from math_verify import parse, verify  # imported lazily: antlr grammar load

    # math-verify times out with signal.alarm, which only the main thread may set: elsewhere (an async or
    # threaded reward) it raises, which would score every answer by string equality; there it runs untimed
    main = threading.current_thread() is threading.main_thread()
    parse_kw, verify_kw = ({}, {}) if main else ({"parsing_timeout": None}, {"timeout_seconds": None})

    def _parse(s):
        s = s.strip()
        return parse(s if s.startswith("$") else f"${s}$", **parse_kw)

    try:
        return bool(verify(_parse(reference), _parse(predicted), **verify_kw))
    except Exception:  # math-verify raises on unparsable input; that is simply a wrong answer
        return predicted.strip() == reference.strip()


def math_reward(prompts, completions, answer, **kwargs) -> list[float]:
    r"""1.0 when the completion's final answer equals the reference `answer` column (GSM8K, MATH).

    >>> math_reward(["q", "q"], ["... so \boxed{72}", "<answer>71</answer>"], answer=["72", "72"])
    [1.0, 0.0]
    """
    return [float(answers_match(final_answer(completion_text(c)), str(a))) for c, a in zip(completions, answer)]
