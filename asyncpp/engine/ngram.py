"""Prompt-lookup (n-gram) proposals from a sequence's own tokens.

Each sequence keeps an index from every n-gram of its tokens (prompt_lookup_min <= n <=
prompt_lookup_max) to the latest position where it ends. A step indexes only the tokens
added since the last one and looks up the current suffix once per n: O(k + n_max^2) work a
step, not a scan of the whole context.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Tokens = Callable[[int, int], list[int]]  # token ids [start, end) of prompt + output (Sequence.tokens)


@dataclass(slots=True)
class NgramIndex:
    low: int  # prompt_lookup_min
    high: int  # prompt_lookup_max
    # ends[n - low][hash of an n-gram] = the latest position where it ends (hashes, not tuples: a
    # collision only costs a proposal that verification rejects).
    ends: list[dict[int, int]] = field(default_factory=list)
    indexed: int = 0  # n-grams ending before this position are in `ends`

    def __post_init__(self) -> None:
        if not self.ends:
            self.ends = [{} for _ in range(self.high - self.low + 1)]

    def propose(self, tokens: Tokens, length: int, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix
        n-gram of the first `length` tokens; [] when no suffix n-gram occurred before."""
        last = length - 1
        if k < 1 or last < self.low:
            return []
        self._index(tokens, last)
        tail = tokens(max(0, length - self.high), length)
        for n in range(min(self.high, last), self.low - 1, -1):
            end = self.ends[n - self.low].get(hash(tuple(tail[-n:])))
            if end is not None:
                return tokens(end + 1, min(end + 1 + k, length))
        return []

    def _index(self, tokens: Tokens, upto: int) -> None:
        """Add the n-grams ending at positions [indexed, upto)."""
        if upto <= self.indexed:
            return
        first = max(0, self.indexed - self.high + 1)
        window = tokens(first, upto)
        for end in range(self.indexed, upto):
            stop = end - first + 1
            for n in range(self.low, min(self.high, end + 1) + 1):
                self.ends[n - self.low][hash(tuple(window[stop - n:stop]))] = end
        self.indexed = upto


@dataclass(slots=True)
class DraftState:
    """One sequence's proposer: its n-gram index (None: a draft model proposes), and the back-off
    after drafts nothing of which was accepted."""
    index: NgramIndex | None
    misses: int = 0  # drafts in a row with no token accepted
    pause: int = 0  # steps left without proposals

    MAX_PAUSE = 32

    def verified(self, accepted: int) -> None:
        """After a draft that found no acceptance, wait 2, 4, ... MAX_PAUSE steps before the next:
        a sequence whose context does not repeat stops paying for verifying proposals."""
        if accepted:
            self.misses = 0
            return
        self.misses += 1
        self.pause = min(self.MAX_PAUSE, 1 << self.misses)
