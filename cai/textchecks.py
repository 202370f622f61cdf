"""Checks on a generated text that need no model: is it repetitive, is it a copy of another
text. Shared by the critique stage's degenerate checks, the refusal classifier's degenerate
split and the RL reward's rule terms. Knows text only.
"""

from __future__ import annotations

import re


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def repetitive(text: str) -> bool:
    words = text.lower().split()
    if len(words) >= 16:
        grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
        if len(set(grams)) / len(grams) < 0.5:
            return True
    lines = [_norm(line) for line in text.splitlines() if len(line.strip()) > 8]
    return any(lines.count(line) >= 3 for line in set(lines))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def copies(text: str, other: str) -> bool:
    """text is other again: the same words, or nearly all of one inside the other."""
    a, b = _words(text), _words(other)
    if not a or not b:
        return False
    return len(a & b) / min(len(a), len(b)) >= 0.8 and len(a & b) / max(len(a), len(b)) >= 0.5


def shares_run(text: str, other: str, n: int = 8) -> bool:
    """text repeats a run of n words of other (a model reciting its instructions)."""
    a, b = re.findall(r"[a-z0-9']+", text.lower()), re.findall(r"[a-z0-9']+", other.lower())
    runs = {tuple(b[i : i + n]) for i in range(len(b) - n + 1)}
    return any(tuple(a[i : i + n]) in runs for i in range(len(a) - n + 1))
