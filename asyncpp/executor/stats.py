"""Pipeline accounting: how busy each stage was while microbatches were in flight."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class PipelineStats:
    stage_busy_s: list[float]  # compute seconds per stage since start
    active_s: float  # seconds with at least one microbatch in flight
    microbatches: int = 0
    tokens: int = 0  # tokens computed (prompt chunks and decodes), over all microbatches
    in_flight_mean: float = 0.0  # microbatches in the pipeline, averaged over active time
    in_flight_max: int = 0

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
    """Accumulates the time during which at least one microbatch is in flight, and how
    many were in flight over that time."""
    in_flight: int = 0
    active_s: float = 0.0
    weighted_s: float = 0.0  # integral of in_flight over time
    most: int = 0
    since: float = 0.0  # start of the current active period
    changed: float = 0.0  # last change of in_flight
    count: int = 0

    tokens: int = 0

    def started(self, tokens: int) -> None:
        self.tokens += tokens
        now = self._advance()
        if self.in_flight == 0:
            self.since = now
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.count += 1

    def finished(self) -> None:
        now = self._advance()
        self.in_flight -= 1
        if self.in_flight == 0:
            self.active_s += now - self.since

    def _advance(self) -> float:
        now = time.perf_counter()
        self.weighted_s += self.in_flight * (now - self.changed)
        self.changed = now
        return now

    def total(self) -> float:
        running = time.perf_counter() - self.since if self.in_flight else 0.0
        return self.active_s + running

    def mean(self) -> float:
        active = self.total()
        pending = self.in_flight * (time.perf_counter() - self.changed)
        return (self.weighted_s + pending) / active if active > 0 else 0.0
