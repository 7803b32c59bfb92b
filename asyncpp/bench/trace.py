"""Per-request timing: when a request started and when each batch of its tokens arrived."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class RequestTrace:
    start: float = 0.0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, new tokens)
    token_ids: list[int] = field(default_factory=list)
    received: int = 0

    def record(self, now: float, total_tokens: int) -> None:
        """Called with the cumulative token count of each output as it arrives."""
        if total_tokens > self.received:
            self.arrivals.append((now, total_tokens - self.received))
            self.received = total_tokens

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0][0] - self.start if self.arrivals else None

    @property
    def end(self) -> float:
        return self.arrivals[-1][0] if self.arrivals else self.start

    def inter_token_latencies(self) -> list[float]:
        """Gaps between output arrivals; an arrival carrying k tokens counts as k gaps of gap/k."""
        gaps: list[float] = []
        for (prev, _), (now, new) in zip(self.arrivals, self.arrivals[1:]):
            gaps.extend([(now - prev) / new] * new)
        return gaps


def percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1e3 if values else None
