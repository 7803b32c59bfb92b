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


def test_metrics_show_the_split_and_its_live_moves():
    from asyncpp.async_llm import EngineStats
    from asyncpp.engine.rebalancer import RebalanceStats
    from asyncpp.executor.stats import PipelineStats

    stats = EngineStats(pipeline=PipelineStats([1.0, 2.0], 4.0), layer_partition=[2.5, 1.5],
                        rebalance=RebalanceStats(moves=2, last_pause_ms=12.5))
    text = ServerMetrics(lambda: stats, "m").render().decode()
    assert 'asyncpp:stage_layers{model_name="m",stage="0"} 2.5' in text
    assert 'asyncpp:pp_rebalance_moves_total{model_name="m"} 2.0' in text
    assert 'asyncpp:pp_rebalance_last_pause_ms{model_name="m"} 12.5' in text
