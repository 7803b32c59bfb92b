"""Stop strings: find one in newly generated text, and hold back text that may become one."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class StopMatch(NamedTuple):
    text: str  # the output text cut before the stop string (after it with include_stop_str_in_output)
    stop: str  # the stop string that matched


def find_stop(text: str, new_char_count: int, stop: Sequence[str],
              include_stop_str_in_output: bool = False) -> StopMatch | None:
    """The stop string that the last `new_char_count` characters of `text` completed, if any.

    Only matches ending inside the new characters count: older text was checked before. When
    several complete in the same delta, the one that completed first wins (then the longest).
    """
    if new_char_count <= 0 or not stop:
        return None
    best: tuple[int, int, str] | None = None  # (end, start, stop): earliest end, then longest
    for candidate in stop:
        start = text.find(candidate, max(0, len(text) - new_char_count - len(candidate) + 1))
        if start != -1:
            key = (start + len(candidate), start, candidate)
            best = key if best is None else min(best, key)
    if best is None:
        return None
    end, start, matched = best
    return StopMatch(text[:end] if include_stop_str_in_output else text[:start], matched)


def hold_back_length(text: str, stop: Sequence[str], include_stop_str_in_output: bool = False) -> int:
    """How many trailing characters of `text` to keep from the user for now.

    They are the longest tail of `text` that begins some stop string; if that stop string
    completes it is cut from the output, so those characters must not have been streamed.
    With include_stop_str_in_output the stop string stays in the output, so nothing is held.
    """
    if include_stop_str_in_output:
        return 0
    longest = 0
    for candidate in stop:
        for length in range(min(len(candidate) - 1, len(text)), longest, -1):
            if text.endswith(candidate[:length]):
                longest = length
                break
    return longest

