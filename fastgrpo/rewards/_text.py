"""Small text helpers shared by the answer checker and the key-step matcher."""

from __future__ import annotations

import re


def sub_until_stable(pattern: re.Pattern, repl, s: str, max_rounds: int) -> str:
    """Apply ``pattern.sub(repl, s)`` until the text stops changing (nested constructs such
    as ``\\frac{\\frac{a}{b}}{c}`` unwrap one level per round), at most ``max_rounds`` times."""
    for _ in range(max_rounds):
        s2 = pattern.sub(repl, s)
        if s2 == s:
            break
        s = s2
    return s
