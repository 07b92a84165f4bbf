"""Helpers shared by the reward functions: completions arrive as strings or as chat messages (TRL)."""

from __future__ import annotations


def completion_text(completion) -> str:
    """The text of a completion given as a string or as a list of chat messages (TRL's two formats).

    >>> completion_text("42")
    '42'
    >>> completion_text([{"role": "assistant", "content": "42"}])
    '42'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
