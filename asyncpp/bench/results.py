"""One row of the bench table (a system's timed run) and how runs become rows."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from asyncpp.bench.trace import RequestTrace, percentile_ms
from asyncpp.core.stages import format_partition


@dataclass(slots=True)
class SystemResult:
    name: str
    kind: str  # "asyncpp", or a peer's kind ("hf", "vllm" in benchmarks/throughput.py)
    precision: str = ""  # Precision.label: rows are compared (parity, vs P=1) within one precision
    requests: int = 0
    output_tokens: int = 0
    total_s: float = 0.0
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    busy_fractions: list[float] | None = None
    bubble_fraction: float | None = None
    in_flight: tuple[float, int] | None = None  # microbatches in the pipeline: mean, max
    layer_partition: list[float] | None = None
    layer_partition_source: str = ""  # "auto" (measured at start-up), "cost" (estimated), "given"
    stage_weight_mib: list[float] | None = None  # weights each stage holds (its largest TP rank)
    speedup_vs_hf: float | None = None  # set by benchmarks/throughput.py when HF ran
    ratio_vs_p1: float | None = None
    note: str = ""
    error: str | None = None
    runs_tok_s: list[float] = field(default_factory=list)  # every timed run, when repeated
    token_ids: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def layers(self) -> str:
        """The split, and how it was chosen when there are stages to split between ("" for none)."""
        if not self.layer_partition:
            return ""
        return " ".join(filter(None, [format_partition(self.layer_partition), self.layer_partition_source]))

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.total_s if self.total_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("token_ids")
        data["tokens_per_s"] = self.tokens_per_s
        return data


def summarize(name: str, kind: str, traces: list[RequestTrace], total_s: float) -> SystemResult:
    ttfts = [t.ttft for t in traces if t.ttft is not None]
    itls = [gap for t in traces for gap in t.inter_token_latencies()]
    return SystemResult(
        name=name, kind=kind, requests=len(traces), output_tokens=sum(len(t.token_ids) for t in traces),
        total_s=total_s, ttft_p50_ms=percentile_ms(ttfts, 50), ttft_p99_ms=percentile_ms(ttfts, 99),
        itl_p50_ms=percentile_ms(itls, 50), itl_p99_ms=percentile_ms(itls, 99),
        token_ids=[t.token_ids for t in traces])


def median_run(runs: list[SystemResult]) -> SystemResult:
    """The run with the median tokens/s (a real run, so its latencies belong to it), carrying
    every run's tokens/s."""
    ok = sorted((r for r in runs if r.ok), key=lambda r: r.tokens_per_s)
    if not ok:
        return runs[-1]
    chosen = ok[(len(ok) - 1) // 2]
    chosen.runs_tok_s = [r.tokens_per_s for r in runs if r.ok]
    return chosen


def add_ratio_vs_p1(results: list[SystemResult]) -> None:
    """Each asyncpp row against the P=1 row of its own precision."""
    ok = [r for r in results if r.ok and r.kind == "asyncpp"]
    for r in ok:
        p1 = next((x for x in ok if x.name == f"P=1 {r.precision}".strip()), None)
        if p1 is not None and p1.tokens_per_s > 0:
            r.ratio_vs_p1 = r.tokens_per_s / p1.tokens_per_s
