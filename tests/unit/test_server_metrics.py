"""Server metrics without a server: each app has its own registry."""
from __future__ import annotations

from asyncpp.async_llm import EngineStats
from asyncpp.engine.speculator import SpecDecodeStats
from asyncpp.server.metrics import ServerMetrics
from asyncpp.server.stats_log import spec_decode_line


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


def test_speculative_decoding_metrics_use_vllms_names():
    spec = SpecDecodeStats(num_drafts=4, num_draft_tokens=10, num_accepted_tokens=6, accepted_per_position=[4, 2, 0])
    stats = EngineStats(spec_decode=spec)
    text = ServerMetrics(lambda: stats, "m").render().decode()
    for line in ('asyncpp:spec_decode_num_drafts_total{model_name="m"} 4.0',
                 'asyncpp:spec_decode_num_draft_tokens_total{model_name="m"} 10.0',
                 'asyncpp:spec_decode_num_accepted_tokens_total{model_name="m"} 6.0',
                 'asyncpp:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"} 2.0',
                 'asyncpp:spec_decode_draft_acceptance_rate{model_name="m"} 0.6'):
        assert line in text
    assert "spec_decode" not in ServerMetrics(lambda: EngineStats(), "m").render().decode()
    before = EngineStats(spec_decode=SpecDecodeStats(accepted_per_position=[0, 0, 0]))
    assert spec_decode_line(before, stats) == (
        "SpecDecoding metrics: Mean acceptance length: 2.50, Accepted: 6 tokens, Drafted: 10 tokens, "
        "Per-position acceptance rate: 1.000, 0.500, 0.000, Avg Draft acceptance rate: 60.0%")


def test_a_draft_models_time_is_reported_beside_the_counters():
    spec = SpecDecodeStats(num_drafts=2, num_draft_tokens=6, num_accepted_tokens=3, accepted_per_position=[2, 1, 0],
                           draft_seconds=1.25)
    stats = EngineStats(spec_decode=spec)
    assert 'asyncpp:spec_decode_draft_seconds_total{model_name="m"} 1.25' in ServerMetrics(lambda: stats,
                                                                                            "m").render().decode()
    before = EngineStats(spec_decode=SpecDecodeStats(accepted_per_position=[0, 0, 0], draft_seconds=0.25))
    assert spec_decode_line(before, stats).endswith("Avg Draft acceptance rate: 50.0%, Draft model time: 1.00 s")
