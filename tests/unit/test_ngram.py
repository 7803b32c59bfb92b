"""The n-gram (prompt lookup) proposer: incremental, and the same as a scan of the whole context."""
from __future__ import annotations

import random

import pytest

from asyncpp.engine.ngram import DraftState, NgramIndex


def propose(tokens: list[int], low: int, high: int, k: int) -> list[int]:
    index = NgramIndex(low, high)
    return index.propose(lambda a, b: tokens[a:b], len(tokens), k)


def scan(tokens: list[int], low: int, high: int, k: int) -> list[int]:
    """The rule, by brute force: the longest suffix n-gram (low..high) seen earlier, its latest
    earlier occurrence, and up to k tokens after it."""
    last = len(tokens) - 1
    for n in range(min(high, last), low - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for end in range(last - 1, n - 2, -1):
            if tokens[end - n + 1:end + 1] == suffix:
                return tokens[end + 1:min(end + 1 + k, len(tokens))]
    return []


def test_the_longest_match_wins_over_a_later_shorter_one():
    tokens = [1, 2, 3, 9, 8, 3, 7, 1, 2, 3]
    assert propose(tokens, 1, 3, 2) == [9, 8]  # "1 2 3" before "3" (followed by 7)
    assert propose(tokens, 1, 1, 2) == [7, 1]  # only 1-grams: the latest "3"


def test_the_latest_occurrence_and_k_bound_the_proposal():
    tokens = [5, 6, 1, 5, 6, 2, 4, 5, 6]
    assert propose(tokens, 2, 2, 3) == [2, 4, 5]
    assert propose(tokens, 2, 2, 1) == [2]


def test_no_match_or_a_suffix_shorter_than_the_minimum_proposes_nothing():
    assert propose([1, 2, 3, 4], 1, 3, 4) == []
    assert propose([1, 2, 9, 2], 2, 3, 4) == []  # "2" repeats, but no 2-gram does
    assert propose([7], 1, 3, 4) == []
    assert propose([7, 7], 1, 3, 4) == [7]  # what follows the match stops at the end of the context


def test_a_proposal_may_run_into_the_suffix_itself():
    assert propose([4, 4, 4, 4], 1, 2, 5) == [4]  # "4 4" ends latest at position 2; only position 3 follows


@pytest.mark.parametrize("seed,low,high", [(0, 1, 3), (1, 2, 4), (2, 3, 3), (3, 1, 1)])
def test_growing_one_token_at_a_time_matches_a_full_scan(seed, low, high):
    rng = random.Random(seed)
    tokens = [rng.randrange(6) for _ in range(30)]
    index = NgramIndex(low, high)
    for _ in range(150):
        k = rng.randint(1, 5)
        got = index.propose(lambda a, b: tokens[a:b], len(tokens), k)
        assert got == scan(tokens, low, high, k)
        tokens += got[:rng.randint(0, len(got))] + [rng.randrange(6)]  # some accepted, then a new token


def test_a_draft_with_nothing_accepted_pauses_proposals_longer_each_time():
    state = DraftState(NgramIndex(1, 2))
    state.verified(0)
    assert (state.misses, state.pause) == (1, 2)
    state.verified(0)
    assert state.pause == 4
    for _ in range(10):
        state.verified(0)
    assert state.pause == DraftState.MAX_PAUSE
    state.verified(2)
    assert state.misses == 0
