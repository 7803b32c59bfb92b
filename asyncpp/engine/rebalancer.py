"""--pp-rebalance: every window, the per-stage busy fractions of the window go to the rule
(core/rebalance_rule.py); a move it calls for runs through engine/live_move.py. Also the
engine's record of moves (stats, /metrics), and the one-move-at-a-time lock that manual
moves (AsyncLLM.repartition) share."""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import anyio

from asyncpp.core.rebalance_rule import Move, Predict, RebalancePolicy, WindowSample, decide
from asyncpp.core.stages import format_partition
from asyncpp.engine.live_move import MoveResult, move_split
from asyncpp.engine.virtual_engine import VirtualEngine
from asyncpp.executor.executor import Executor
from asyncpp.executor.stats import PipelineStats
from asyncpp.executor.supervisor import Supervisor

log = logging.getLogger("asyncpp")


@dataclass(slots=True)
class RebalanceStats:
    moves: int = 0  # moves made
    last_pause_ms: float = 0.0  # the last move's pause: no microbatch sent (the changed stages rebuild in it)
    abandoned: int = 0  # moves begun and given up (the old split kept serving)


@dataclass(slots=True)
class _Baseline:
    executor: Executor
    stats: PipelineStats
    at: float


class Rebalancer:
    def __init__(self, supervisor: Supervisor, ves: Sequence[VirtualEngine], policy: RebalancePolicy,
                 window_s: float, predict: Predict | None = None):
        """`predict`: each stage's time under a split, from the measured timing table when one
        is cached; a move it predicts no gain for is not made."""
        self.supervisor = supervisor
        self.ves = ves
        self.policy = policy
        self.window_s = window_s
        self.predict = predict
        self.stats = RebalanceStats()
        self.history: list[Move] = []
        self._lock = anyio.Lock()
        self._baseline: _Baseline | None = None

    async def run(self) -> None:
        """Decide once per window, for as long as the engine serves."""
        self.begin()
        for index in itertools.count():
            await anyio.sleep(self.window_s)
            await self.step(index)

    def begin(self) -> None:
        """The first window starts now."""
        self._baseline = self._snapshot()

    async def step(self, index: int) -> Move | None:
        """End window `index`: the move its busy fractions call for, made (None: none made)."""
        sample = self._window(index)
        return await self._consider(sample) if sample is not None else None

    async def move(self, parts: list[float]) -> MoveResult:
        """Serve from `parts` now (one move at a time)."""
        async with self._lock:
            result = await move_split(self.supervisor, self.ves, list(parts))
            if result.moved:
                self.stats.moves += 1
                self.stats.last_pause_ms = result.pause_s * 1e3
            else:
                self.stats.abandoned += 1
            self._baseline = self._snapshot()  # the move's pause and re-prefill are no evidence
            return result

    async def _consider(self, sample: WindowSample) -> Move | None:
        parts = list(self.supervisor.config.layer_partition)
        move = decide(self.policy, sample, parts, self.history, self.predict)
        if move is None:
            return None
        log.info("re-balancing: stage busy fractions %s over the last %g s; moving layer halves from stage %d to "
                 "stage %d (%s -> %s)", "/".join(f"{b:.2f}" for b in sample.busy), self.window_s, move.donor,
                 move.receiver, format_partition(move.before), format_partition(move.after))
        if not (await self.move(list(move.after))).moved:
            return None
        self.history.append(move)
        return move

    def _window(self, index: int) -> WindowSample | None:
        """The busy fractions since the last window; None when the stages changed meanwhile."""
        before, now = self._baseline, self._snapshot()
        self._baseline = now
        if before is None or now is None or before.executor is not now.executor:
            return None
        active = now.stats.active_s - before.stats.active_s
        busy = [b - a for a, b in zip(before.stats.stage_busy_s, now.stats.stage_busy_s)]
        fractions = tuple(min(1.0, b / active) if active > 0 else 0.0 for b in busy)
        return WindowSample(index, fractions, active / max(now.at - before.at, 1e-9))

    def _snapshot(self) -> _Baseline | None:
        executor = self.supervisor.executor
        if executor is None:
            return None
        return _Baseline(executor, executor.stats(), time.monotonic())
