"""When to move layer halves across a stage boundary while serving: a pure function of each
window's per-stage busy fractions, the current split and the moves made so far, so that the
rule is tested without an engine (tests/unit/test_rebalance_rule.py)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from asyncpp.core.stages import from_halves, to_halves

# Each stage's predicted seconds under a split (from the measured timing table), when known.
Predict = Callable[[list[float]], list[float]]


@dataclass(frozen=True, slots=True)
class RebalancePolicy:
    threshold: float = 0.10  # the slowest stage this far above the mean busy fraction triggers a move
    min_active: float = 0.5  # share of the window with work in flight: an idle window is no evidence
    min_gain: float = 0.02  # with a timing table: the slowest stage's predicted time must drop this much
    hold_windows: int = 2  # a move is never undone within this many windows


@dataclass(frozen=True, slots=True)
class Move:
    window: int  # the window whose evidence made it
    donor: int  # the stage that gives one layer half
    receiver: int  # its neighbour that takes it
    before: tuple[float, ...]
    after: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class WindowSample:
    """One window of the pipeline: each stage's busy fraction over the window's active time."""
    index: int
    busy: tuple[float, ...]
    active_share: float  # the window's share with at least one microbatch in flight


def decide(policy: RebalancePolicy, sample: WindowSample, parts: Sequence[float], moves: Sequence[Move],
           predict: Predict | None = None) -> Move | None:
    """The move this window calls for, if any: layer halves from the busiest stage to its less
    busy neighbour, as many as the two busy fractions say balance them (at least one; with a
    timing table, the count it predicts best among those). None when the window is idle or
    follows a move (its times include the pause and the re-prefill), the imbalance is under
    the threshold, the donor would lose its last layer, the move would undo a recent one, or
    the timing table predicts no gain."""
    if len(parts) < 2 or sample.active_share < policy.min_active or _settling(sample.index, moves):
        return None
    busy = sample.busy
    mean = sum(busy) / len(busy)
    donor = max(range(len(busy)), key=lambda s: busy[s])
    if mean <= 0 or busy[donor] <= (1 + policy.threshold) * mean:
        return None
    receiver = min((s for s in (donor - 1, donor + 1) if 0 <= s < len(busy)), key=lambda s: busy[s])
    donor_halves = to_halves(parts)[donor]
    most = min(_balancing_halves(busy[donor], busy[receiver], donor_halves), donor_halves - 2)
    if most < 1 or _undoes(donor, receiver, sample.index, moves, policy.hold_windows):
        return None
    options = [_shifted(parts, donor, receiver, n) for n in range(1, most + 1)]
    after = options[-1]
    if predict is not None:
        after = min(options, key=lambda split: max(predict(split)))  # the first (fewest halves) of equals
        if max(predict(after)) >= (1 - policy.min_gain) * max(predict(list(parts))):
            return None
    return Move(sample.index, donor, receiver, tuple(parts), tuple(after))


def _settling(index: int, moves: Sequence[Move]) -> bool:
    return bool(moves) and index - moves[-1].window <= 1


def _undoes(donor: int, receiver: int, index: int, moves: Sequence[Move], hold: int) -> bool:
    return any(m.donor == receiver and m.receiver == donor and index - m.window <= hold for m in moves)


def _balancing_halves(donor_busy: float, receiver_busy: float, donor_halves: int) -> int:
    """Halves to move so that the two stages' busy fractions meet, taking each of the donor's
    halves to cost the same share of its time: rounded down, so a move never overshoots on
    that estimate (the head or the embedding make some halves dearer), and at least one."""
    per_half = donor_busy / donor_halves
    return max(1, int((donor_busy - receiver_busy) / (2 * per_half)))


def _shifted(parts: Sequence[float], donor: int, receiver: int, count: int) -> list[float]:
    """The split with `count` halves moved across the boundary between two neighbours (the
    caller leaves the donor at least one layer: every stage holds one)."""
    halves = to_halves(parts)
    halves[donor] -= count
    halves[receiver] += count
    return from_halves(halves)
