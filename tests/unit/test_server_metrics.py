"""Server metrics without a server: each app has its own registry."""
from __future__ import annotations

from asyncpp.server.metrics import ServerMetrics


def observed(metrics: ServerMetrics) -> int:
    """How many time-to-first-token values the app's histogram holds."""
    return sum(s.value for family in metrics.ttft.collect() for s in family.samples if s.name.endswith("_count"))


def test_metrics_registries_are_per_app():
    first, second = ServerMetrics(lambda: None, "a"), ServerMetrics(lambda: None, "b")
    first.ttft.observe(0.5)
    assert first.registry is not second.registry
    assert (observed(first), observed(second)) == (1, 0)
