"""The live re-balancing rule as a pure function of a fake busy-fraction history."""
from __future__ import annotations

from asyncpp.core.rebalance_rule import Move, RebalancePolicy, WindowSample, decide

POLICY = RebalancePolicy(threshold=0.10, min_active=0.5, min_gain=0.02, hold_windows=2)


def window(index: int, *busy: float, active: float = 1.0) -> WindowSample:
    return WindowSample(index, tuple(busy), active)


def test_balanced_window_makes_no_move():
    assert decide(POLICY, window(0, 0.80, 0.76), [2, 2], []) is None


def test_slowest_stage_above_threshold_gives_a_half_to_its_neighbour():
    move = decide(POLICY, window(0, 0.95, 0.60), [3, 1], [])
    assert move == Move(0, 0, 1, (3, 1), (2.5, 1.5))
    move = decide(POLICY, window(4, 0.50, 0.90), [2, 2], [])
    assert move is not None and move.after == (2.5, 1.5)


def test_just_under_the_threshold_is_not_enough():
    # mean 0.8; 0.875 is 9.4% above it
    assert decide(POLICY, window(0, 0.875, 0.725), [3, 1], []) is None
    assert decide(POLICY, window(0, 0.885, 0.715), [3, 1], []) is not None


def test_the_lighter_neighbour_receives():
    move = decide(POLICY, window(0, 0.5, 0.95, 0.7), [2, 3, 2], [])
    assert move is not None and (move.donor, move.receiver, move.after) == (1, 0, (2.5, 2.5, 2))
    move = decide(POLICY, window(0, 0.7, 0.95, 0.5), [2, 3, 2], [])
    assert move is not None and (move.donor, move.receiver, move.after) == (1, 2, (2, 2.5, 2.5))


def test_an_idle_window_is_no_evidence():
    assert decide(POLICY, window(0, 0.5, 0.1, active=0.2), [3, 1], []) is None


def test_a_stage_keeps_at_least_one_layer():
    assert decide(POLICY, window(0, 0.9, 0.3), [1, 3], []) is None
    move = decide(POLICY, window(0, 0.9, 0.3), [1.5, 2.5], [])
    assert move is not None and move.after == (1, 3)


def test_the_window_after_a_move_is_skipped():
    first = decide(POLICY, window(0, 0.95, 0.6), [3, 1], [])
    assert first is not None
    assert decide(POLICY, window(1, 0.95, 0.6), list(first.after), [first]) is None
    assert decide(POLICY, window(2, 0.95, 0.6), list(first.after), [first]) is not None


def test_a_move_is_not_undone_within_two_windows():
    first = decide(POLICY, window(0, 0.95, 0.6), [3, 1], [])
    assert first is not None
    parts = list(first.after)
    assert decide(POLICY, window(2, 0.6, 0.95), parts, [first]) is None
    undo = decide(POLICY, window(3, 0.6, 0.95), parts, [first])
    assert undo is not None and undo.after == (3, 1)


def test_no_oscillation_over_an_alternating_history():
    """Busy fractions that flip every window (a noisy workload) move at most once per
    three windows, and never back within the hold."""
    parts, moves = [4.0, 4.0], []
    for i in range(12):
        busy = (0.95, 0.6) if i % 2 == 0 else (0.6, 0.95)
        move = decide(POLICY, window(i, *busy), parts, moves)
        if move is not None:
            moves.append(move)
            parts = list(move.after)
    windows = [m.window for m in moves]
    assert all(b - a >= 2 for a, b in zip(windows, windows[1:]))
    for a, b in zip(moves, moves[1:]):
        if (a.donor, a.receiver) == (b.receiver, b.donor):
            assert b.window - a.window > POLICY.hold_windows


def test_a_move_takes_as_many_halves_as_balance_the_two_stages():
    # 2,6 with the second stage 3.3x as busy: 4 of its 12 halves balance them
    move = decide(POLICY, window(0, 0.29, 0.97), [2, 6], [])
    assert move is not None and move.after == (4, 4)
    # rounded down: 0.95 vs 0.59 over 12 halves is 2.27 halves' worth
    move = decide(POLICY, window(0, 0.95, 0.59), [6, 2], [])
    assert move is not None and move.after == (5, 3)
    # never past the donor's last layer
    move = decide(POLICY, window(0, 0.2, 0.99), [1, 2], [])
    assert move is not None and move.after == (1.5, 1.5)


def test_a_timing_table_picks_the_count_it_predicts_best():
    def head_heavy(parts: list[float]) -> list[float]:  # the last stage's head weighs two layers
        return [parts[0], parts[1] + 2]

    move = decide(POLICY, window(0, 0.29, 0.97), [2, 6], [], predict=head_heavy)
    assert move is not None and move.after == (4, 4)
    move = decide(POLICY, window(0, 0.97, 0.29), [6, 2], [], predict=head_heavy)
    assert move is not None and move.after == (5, 3)  # 5 vs 5 where 4,4 gives 4 vs 6


def test_one_move_per_window_converges_on_a_steady_history():
    """Stage times proportional to layers: from 6,2 the rule reaches 4,4 and stops."""
    parts, moves = [6.0, 2.0], []
    for i in range(20):
        busy = tuple(p / max(parts) for p in parts)
        move = decide(POLICY, window(i, *busy), parts, moves)
        if move is not None:
            assert not moves or moves[-1].window < i
            moves.append(move)
            parts = list(move.after)
    assert parts == [4.0, 4.0] or parts == [4.5, 3.5]
    assert len(moves) <= 4


def test_a_timing_table_that_predicts_no_gain_vetoes_the_move():
    def flat(parts: list[float]) -> list[float]:
        return [1.0 for _ in parts]

    def by_layers(parts: list[float]) -> list[float]:
        return list(parts)

    assert decide(POLICY, window(0, 0.95, 0.6), [3, 1], [], predict=flat) is None
    assert decide(POLICY, window(0, 0.95, 0.6), [3, 1], [], predict=by_layers) is not None
