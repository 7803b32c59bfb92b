"""Stop strings: matched only in new text, cut from the output, never leaked while streaming."""
from __future__ import annotations

import random

import pytest

from asyncpp.engine.stop_checker import StopMatch, find_stop, hold_back_length


def test_cuts_before_stop_or_keeps_it():
    assert find_stop("Hello world. Bye", 9, ["."]) == StopMatch("Hello world", ".")
    assert find_stop("Hello world. Bye", 9, ["."], include_stop_str_in_output=True) == \
        StopMatch("Hello world.", ".")


def test_no_new_text_or_no_stops():
    assert find_stop("a STOP", 0, ["STOP"]) is None
    assert find_stop("a STOP", 4, []) is None
    assert find_stop("nothing here", 4, ["STOP"]) is None


def test_match_spanning_old_and_new_text():
    # "ST" arrived earlier, "OP and" now: the match began in old text and ends in the new.
    assert find_stop("go STOP and", 6, ["STOP"]) == StopMatch("go ", "STOP")


def test_match_entirely_in_old_text_is_ignored():
    # Text before the delta was checked already (or was protected by min_tokens).
    assert find_stop("STOP then more", 5, ["STOP"]) is None


def test_earliest_completed_stop_wins():
    assert find_stop("say hello world", 15, ["world", "o"]) == StopMatch("say hell", "o")
    # Both complete at the same character: the longer one is cut, so none of it shows.
    assert find_stop("the end", 7, ["end", "he end"]) == StopMatch("t", "he end")


def test_hold_back_only_a_possible_stop_prefix():
    assert hold_back_length("Hello wor", ["world"]) == 3
    assert hold_back_length("Hello", ["world"]) == 0
    assert hold_back_length("a <|im", ["<|im_end|>", "xyz"]) == 4
    assert hold_back_length("Hello wor", ["world"], include_stop_str_in_output=True) == 0
    assert hold_back_length("ab", ["abc", "bcd"]) == 2


def stream(tokens: list[str], stop: list[str], include: bool) -> str:
    """Feed text deltas as the engine does, checking that streamed text is never taken back."""
    text, streamed = "", ""
    for delta in tokens:
        text += delta
        match = find_stop(text, len(delta), stop, include)
        if match is not None:
            assert match.text.startswith(streamed), "the user already saw part of a stop string"
            return match.text
        visible = text[: len(text) - hold_back_length(text, stop, include)]
        assert visible.startswith(streamed)
        streamed = visible
    return text


@pytest.mark.parametrize("include", [False, True])
def test_streaming_never_leaks_a_stop_string(include):
    rng = random.Random(0)
    stops = ["STOP", "<|end|>", "aab"]
    alphabet = ["S", "T", "O", "P", "<|", "end", "|>", "a", "b", " ", "x"]
    for _ in range(2000):
        tokens = [rng.choice(alphabet) for _ in range(rng.randint(1, 12))]
        final = stream(tokens, stops, include)
        full = "".join(tokens)
        hits = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
        if not hits:
            assert final == full
            continue
        end, start, stop = min(hits, key=lambda h: (h[0], -h[1]))
        assert final == (full[:end] if include else full[:start])
