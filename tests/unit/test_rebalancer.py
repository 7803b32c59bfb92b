"""The re-balancer's windows: busy fractions from the executor's cumulative counters, per
window; a move it makes is counted, and the window after it is measured on the new stages."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from asyncpp.core.rebalance_rule import RebalancePolicy
from asyncpp.engine import rebalancer as rebalancer_module
from asyncpp.engine.live_move import MoveResult
from asyncpp.engine.rebalancer import Rebalancer
from asyncpp.executor.stats import PipelineStats

pytestmark = pytest.mark.anyio


@dataclass
class FakeExecutor:
    busy: list[float]
    active: float = 0.0

    def stats(self) -> PipelineStats:
        return PipelineStats(list(self.busy), self.active)

    def work(self, active: float, *busy: float) -> None:
        self.active += active
        self.busy = [b + d for b, d in zip(self.busy, busy)]


@dataclass
class FakeConfig:
    layer_partition: list[float]


@dataclass
class FakeSupervisor:
    executor: FakeExecutor
    config: FakeConfig
    moves: list[list[float]] = field(default_factory=list)


@pytest.fixture
def fake_moves(monkeypatch):
    async def move_split(supervisor, ves, parts) -> MoveResult:
        supervisor.moves.append(parts)
        supervisor.executor.work(0.3, 0.3, 0.1)  # the same stages, their counters run on
        supervisor.config = FakeConfig(parts)
        return MoveResult(True, parts, pause_s=0.012, rebuilt=2, recomputed=3)

    monkeypatch.setattr(rebalancer_module, "move_split", move_split)


def rebalancer(supervisor: FakeSupervisor) -> Rebalancer:
    r = Rebalancer(supervisor, [], RebalancePolicy(threshold=0.10, min_active=0.0), window_s=1.0)  # type: ignore[arg-type]
    r.begin()
    return r


async def test_each_window_counts_only_its_own_work(fake_moves):
    supervisor = FakeSupervisor(FakeExecutor([0.0, 0.0]), FakeConfig([3.0, 1.0]))
    r = rebalancer(supervisor)
    supervisor.executor.work(100.0, 90.0, 90.0)  # a long balanced history ...
    assert await r.step(0) is None
    supervisor.executor.work(1.0, 0.95, 0.5)  # ... does not dilute an unbalanced window
    move = await r.step(1)
    assert move is not None and (move.donor, move.receiver, move.after) == (0, 1, (2.5, 1.5))
    assert supervisor.moves == [[2.5, 1.5]]
    stats = r.stats
    assert (stats.moves, stats.last_pause_ms, stats.abandoned) == (1, 12.0, 0)


async def test_the_window_after_a_move_is_measured_on_the_new_stages(fake_moves):
    supervisor = FakeSupervisor(FakeExecutor([0.0, 0.0]), FakeConfig([3.0, 1.0]))
    r = rebalancer(supervisor)
    supervisor.executor.work(1.0, 0.95, 0.5)
    assert await r.step(0) is not None
    supervisor.executor.work(1.0, 0.95, 0.5)  # the re-prefill after the move: skipped
    assert await r.step(1) is None
    supervisor.executor.work(1.0, 0.95, 0.5)
    move = await r.step(2)
    assert move is not None and move.after == (2.0, 2.0)
    assert supervisor.moves == [[2.5, 1.5], [2.0, 2.0]]


async def test_an_abandoned_move_is_counted_and_not_remembered(monkeypatch):
    async def refused(supervisor, ves, parts) -> MoveResult:
        return MoveResult(False, list(supervisor.config.layer_partition), reason="a stage failed")

    monkeypatch.setattr(rebalancer_module, "move_split", refused)
    supervisor = FakeSupervisor(FakeExecutor([0.0, 0.0]), FakeConfig([3.0, 1.0]))
    r = rebalancer(supervisor)
    supervisor.executor.work(1.0, 0.95, 0.5)
    assert await r.step(0) is None
    assert (r.stats.moves, r.stats.abandoned, r.history) == (0, 1, [])
