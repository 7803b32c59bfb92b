"""Which rank to blame when the pipeline breaks.

When one rank fails its peers fail too, as their sockets close, and they may report that
before the culprit's own exit is seen. So a rank that died without a word is to blame;
reported exceptions count only once no such death came within `settle_s`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from asyncpp.core.stages import StageSpec
from asyncpp.core.errors import EngineDeadError, StageDiedError


@dataclass(slots=True)
class Report:
    at: float  # time.monotonic() in the reporting process (system-wide on Linux)
    summary: str  # "ValueError: ..."
    text: str  # the traceback


@dataclass(slots=True)
class RootCause:
    stages: list[StageSpec]
    settle_s: float = 1.0
    reports: dict[int, Report] = field(default_factory=dict)  # rank -> its exception
    settle_until: float | None = None

    def reported(self, rank: int, report: Report) -> None:
        self.reports.setdefault(rank, report)
        if self.settle_until is None:
            self.settle_until = time.monotonic() + self.settle_s

    def wait_s(self) -> float | None:
        """How long to wait for more evidence before `verdict` can blame a report."""
        return None if self.settle_until is None else max(0.0, self.settle_until - time.monotonic())

    def verdict(self, died: list[tuple[int, int | None]], final: bool = False) -> EngineDeadError | None:
        """`died`: (rank, exit code or None) newly seen dead. None: nothing to blame yet.
        `final`: no more evidence can come (nothing else was in flight)."""
        for rank, exitcode in died:
            if rank not in self.reports:
                return StageDiedError(self.stages[rank].pp_rank, rank, exitcode)
        if self.settle_until is None or (not final and time.monotonic() < self.settle_until):
            return None
        rank, first = min(self.reports.items(), key=lambda item: item[1].at)
        return EngineDeadError(f"pipeline stage {self.stages[rank].pp_rank} (rank {rank}) "
                               f"raised {first.summary}\n{first.text}")
