"""Pipeline accounting: how busy each stage was while microbatches were in flight."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class PipelineStats:
    stage_busy_s: list[float]  # compute seconds per stage since start
    active_s: float  # seconds with at least one microbatch in flight
    microbatches: int = 0

    @property
    def busy_fractions(self) -> list[float]:
        if self.active_s <= 0:
            return [0.0 for _ in self.stage_busy_s]
        return [min(1.0, b / self.active_s) for b in self.stage_busy_s]

    @property
    def bubble_fraction(self) -> float:
        fractions = self.busy_fractions
        return 1.0 - sum(fractions) / len(fractions) if fractions and self.active_s > 0 else 0.0


@dataclass(slots=True)
class InFlightClock:
    """Accumulates the time during which at least one microbatch is in flight."""
    in_flight: int = 0
    active_s: float = 0.0
    since: float = 0.0
    count: int = 0

    def started(self) -> None:
        if self.in_flight == 0:
            self.since = time.perf_counter()
        self.in_flight += 1
        self.count += 1

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.active_s += time.perf_counter() - self.since

    def total(self) -> float:
        running = time.perf_counter() - self.since if self.in_flight else 0.0
        return self.active_s + running
