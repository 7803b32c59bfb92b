"""Prometheus metrics, one registry per app (so several apps can live in one process).

Engine-wide numbers (queues, KV usage, token totals, pipeline busy fractions) are read
from `engine.stats()` at scrape time; request latencies are observed as requests finish."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from asyncpp.async_llm import EngineStats
from asyncpp.core.outputs import RequestOutput
from asyncpp.engine.speculator import SpecDecodeStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class EngineStatsCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self.stats, self.model_name = stats, model_name

    def collect(self) -> Iterable[Metric]:
        s = self.stats()
        model = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"asyncpp:{name}", doc, labels=["model_name"])
            g.add_metric(model, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"asyncpp:{name}", doc, labels=["model_name"])
            c.add_metric(model, value)
            return c

        yield gauge("num_requests_running", "Requests being generated.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests (0..1).", s.kv_usage)
        yield gauge("kv_cache_blocks_used", "KV-cache blocks held by requests.", s.kv_blocks_used)
        yield gauge("kv_cache_blocks_cached", "KV-cache blocks holding cached prefixes no request holds "
                    "(free for reuse).", s.kv_blocks_cached)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield gauge("pipeline_bubble_fraction", "Share of pipeline time stages sit idle (0..1).",
                    s.pipeline.bubble_fraction)
        busy = GaugeMetricFamily("asyncpp:stage_busy_fraction", "Share of active time each stage computes.",
                                 labels=["model_name", "stage"])
        layers = GaugeMetricFamily("asyncpp:stage_layers", "Decoder layers each stage runs (the partition).",
                                   labels=["model_name", "stage"])
        for stage, (fraction, count) in enumerate(zip(s.pipeline.busy_fractions, s.layer_partition)):
            busy.add_metric([self.model_name, str(stage)], fraction)
            layers.add_metric([self.model_name, str(stage)], count)
        yield busy
        yield layers
        yield counter("pp_rebalance_moves", "Live moves of the stage split made (--pp-rebalance).",
                      s.rebalance.moves)
        yield gauge("pp_rebalance_last_pause_ms", "The last live move's pause: milliseconds no microbatch was sent.",
                    s.rebalance.last_pause_ms)
        yield gauge("microbatches_in_flight_mean", "Microbatches in the pipeline, averaged over active time.",
                    s.pipeline.in_flight_mean)
        yield gauge("microbatches_in_flight_max", "Most microbatches in the pipeline at once.",
                    s.pipeline.in_flight_max)
        if s.spec_decode is not None:
            yield from self._spec_decode(s.spec_decode, counter, gauge)

    def _spec_decode(self, spec: SpecDecodeStats, counter: Callable[..., Metric],
                     gauge: Callable[..., Metric]) -> Iterable[Metric]:
        """vLLM's speculative-decoding metrics (vllm:spec_decode_*), and its acceptance rate."""
        yield counter("spec_decode_num_drafts", "Proposals verified (one per sequence and step).", spec.num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Proposed tokens verified.", spec.num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Proposed tokens accepted.", spec.num_accepted_tokens)
        per_pos = CounterMetricFamily("asyncpp:spec_decode_num_accepted_tokens_per_pos",
                                      "Proposals whose token at this position was accepted.",
                                      labels=["model_name", "position"])
        for position, count in enumerate(spec.accepted_per_position):
            per_pos.add_metric([self.model_name, str(position)], count)
        yield per_pos
        yield gauge("spec_decode_draft_acceptance_rate", "Accepted / proposed tokens since start (0..1).",
                    spec.acceptance_rate)
        yield counter("spec_decode_draft_seconds", "Seconds the draft model's forwards took (draft-model "
                      "speculation; they run in the engine process).", spec.draft_seconds)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self.registry = CollectorRegistry()
        labels = dict(labelnames=["model_name"], registry=self.registry)
        self.ttft = Histogram("asyncpp:time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, **labels).labels(model_name)
        self.itl = Histogram("asyncpp:inter_token_latency_seconds", "Time between output tokens.",
                             buckets=_ITL_BUCKETS, **labels).labels(model_name)
        self.e2e = Histogram("asyncpp:e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS, **labels).labels(model_name)
        self._finished = Counter("asyncpp:request_success", "Finished requests by finish reason.",
                                 labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.model_name = model_name
        self.registry.register(EngineStatsCollector(stats, model_name))

    def tracker(self) -> "RequestTracker":
        return RequestTracker(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def finished(self, reason: str | None) -> None:
        self._finished.labels(self.model_name, reason or "unknown").inc()


class RequestTracker:
    """Observes one request's latencies from the outputs the server receives."""
    __slots__ = ("metrics", "last_time", "tokens")

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.last_time: float | None = None
        self.tokens = 0

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        tokens = sum(len(c.token_ids) for c in out.outputs)
        new = tokens - self.tokens
        if self.last_time is None:
            if out.metrics and out.metrics.first_token_time is not None:
                self.metrics.ttft.observe(out.metrics.first_token_time - out.metrics.arrival_time)
        elif new > 0:
            gap = (now - self.last_time) / new
            for _ in range(new):
                self.metrics.itl.observe(gap)
        if new > 0:
            self.last_time, self.tokens = now, tokens
        if out.finished:
            if out.metrics:
                end = out.metrics.finished_time or now
                self.metrics.e2e.observe(end - out.metrics.arrival_time)
            for choice in out.outputs:
                self.metrics.finished(choice.finish_reason)
