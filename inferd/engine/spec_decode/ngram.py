"""Prompt lookup: draft tokens copied from the request's own prompt and output.

If the last n tokens of a request already occurred earlier in it, the tokens that
followed that earlier occurrence are a good guess for what comes next (an answer
that quotes, summarizes or edits a given text copies long runs of it). The longest
suffix n-gram (n from `prompt_lookup_max` down to `prompt_lookup_min`) wins, at its
most recent earlier occurrence.

The search is incremental: each request keeps a map from every n-gram it holds
to where that n-gram last ended, extended by the tokens added since the previous
call, so a step costs O(new tokens x n-gram sizes) per request, not a scan of the
whole context. The map never includes the suffix itself (an n-gram that ends at
the last token has no continuation to copy).
"""

from __future__ import annotations


class NgramIndex:
    """One request's n-gram map; `propose` is called with the request's growing token list."""

    __slots__ = ("min_n", "max_n", "_last_end", "_indexed")

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self._last_end: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its latest occurrence
        self._indexed = 0  # n-grams ending at positions < this are in the map

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest earlier occurrence of the suffix."""
        length = len(tokens)
        if k <= 0 or length < self.min_n + 1:
            return []
        self._extend(tokens, length)
        last_end = self._last_end
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = last_end.get(tuple(tokens[length - n:]))
            if end is not None:
                return tokens[end:min(end + k, length)]
        return []

    def _extend(self, tokens: list[int], upto: int) -> None:
        """Index the n-grams ending at positions [self._indexed, upto)."""
        last_end, lo, hi = self._last_end, self.min_n, self.max_n
        for end in range(max(self._indexed, lo), upto):
            for n in range(lo, min(hi, end) + 1):
                last_end[tuple(tokens[end - n:end])] = end
        self._indexed = max(self._indexed, upto)
