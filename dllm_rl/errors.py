"""User-facing errors.

Every error a user can fix (a recipe key, a checkpoint path, a reward's return value, a tokenizer without a
mask token) is a `DllmRlError`: the CLI prints its one-line message and exits with code 2, without a
traceback unless `--traceback` (or `DLLM_RL_TRACEBACK=1`) is given. Messages name the problem *and* the fix.
"""

from __future__ import annotations

import difflib


class DllmRlError(Exception):
    """An error caused by the user's input; the message says what is wrong and how to fix it."""


class ConfigError(DllmRlError, ValueError):
    """A recipe that does not match the typed config tree."""


def did_you_mean(name: str, valid) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def lookup(table: dict, name: str, what: str):
    """`table[name]`, or an error that lists the valid names: the one way variants are chosen by name."""
    try:
        return table[name]
    except KeyError:
        valid = ", ".join(sorted(table))
        raise ConfigError(f"unknown {what} {name!r}{did_you_mean(name, table)}; valid: {valid}") from None
