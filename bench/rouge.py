"""ROUGE-L F1 on jieba word tokens (the score ``inv eval`` reports).

Definition, for a reference ``r`` and a candidate answer ``c``:

- tokens: ``T(x) = [t for t in jieba.lcut(x) if t.strip()]`` (jieba's default, accurate mode, no HMM
  changes; tokens that are only whitespace are dropped; no other normalisation: case and punctuation
  count as they are);
- ``L = LCS(T(r), T(c))``, the length of the longest common subsequence of the two token lists
  (tokens compared for exact equality);
- ``P = L / len(T(c))``, ``R = L / len(T(r))``, ``F1 = 2·P·R / (P + R)`` (beta = 1), which equals
  ``2·L / (len(T(r)) + len(T(c)))``;
- ``F1 = 0`` when either token list is empty or ``L = 0``.

The LCS uses the bit-parallel algorithm of Crochemore et al. (2001) on Python integers:
O(len(c) · len(r) / word size), exact, and fast enough for thousands of long answers.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

with warnings.catch_warnings():  # jieba 0.42 imports the deprecated pkg_resources
    warnings.simplefilter("ignore", DeprecationWarning)
    import jieba

# jieba logs "Building prefix dict ..." through its own logger (with its own stderr handler).
logging.getLogger("jieba").setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True)
class RougeL:
    """ROUGE-L of one candidate against one reference."""

    precision: float
    recall: float
    f1: float
    lcs: int


def tokens(text: str) -> list[str]:
    """jieba words of ``text``, whitespace-only tokens dropped."""
    return [t for t in jieba.lcut(text) if t.strip()]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (bit-parallel, exact)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(reference: str, candidate: str) -> RougeL:
    """ROUGE-L precision, recall and F1 of ``candidate`` against ``reference`` (module docstring)."""
    return rouge_l_tokens(tokens(reference), tokens(candidate))


def rouge_l_tokens(reference: list[str], candidate: list[str]) -> RougeL:
    """ROUGE-L of already tokenised texts."""
    if not reference or not candidate:
        return RougeL(0.0, 0.0, 0.0, 0)
    lcs = lcs_length(reference, candidate)
    if lcs == 0:
        return RougeL(0.0, 0.0, 0.0, 0)
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return RougeL(precision, recall, 2 * precision * recall / (precision + recall), lcs)
