"""Which rank to blame when the pipeline breaks.

When one rank fails its peers fail too, as their sockets close, and they may report that
before the culprit's own exit is seen. So a rank that died without a word is to blame;
reported exceptions count only once no such death came within `settle_s`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from asyncpp.core.errors import EngineDeadError, NodeLostError, StageDiedError
from asyncpp.core.messages import Failure
from asyncpp.core.stages import StageSpec


@dataclass(frozen=True, slots=True)
class Death:
    """A rank seen gone: its process exited (with `exitcode` when known) or its actor died;
    `node` where it ran (Ray), `node_lost` when that whole machine is unreachable."""
    rank: int
    exitcode: int | None = None
    node: str = ""
    node_lost: bool = False

    def error(self, stage: int) -> StageDiedError:
        if self.node_lost:
            return NodeLostError(stage, self.rank, self.node)
        return StageDiedError(stage, self.rank, self.exitcode, f"its Ray actor on node {self.node} died"
                              if self.node else "")


@dataclass(slots=True)
class RootCause:
    stages: list[StageSpec]
    settle_s: float = 1.0
    reports: dict[int, Failure] = field(default_factory=dict)  # rank -> its exception
    settle_until: float | None = None

    def reported(self, failure: Failure) -> None:
        self.reports.setdefault(failure.rank, failure)
        if self.settle_until is None:
            self.settle_until = time.monotonic() + self.settle_s

    def wait_s(self) -> float | None:
        """How long to wait for more evidence before `verdict` can blame a report."""
        return None if self.settle_until is None else max(0.0, self.settle_until - time.monotonic())

    def verdict(self, died: list[Death], final: bool = False) -> EngineDeadError | None:
        """`died`: ranks newly seen dead. None: nothing to blame yet.
        `final`: no more evidence can come (every rank is gone)."""
        for death in died:
            if death.rank not in self.reports:
                return death.error(self.stages[death.rank].pp_rank)
        if self.settle_until is None or (not final and time.monotonic() < self.settle_until):
            return None
        first = min(self.reports.values(), key=lambda f: f.at)
        return EngineDeadError(f"pipeline stage {self.stages[first.rank].pp_rank} (rank {first.rank}) "
                               f"raised {first.summary}\n{first.text}")
