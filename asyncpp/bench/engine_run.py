"""One asyncpp layout on the workload: a fresh engine, a warm-up request, then every prompt at once."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anyio

from asyncpp.async_llm import AsyncLLM
from asyncpp.bench.layout import Layout
from asyncpp.bench.results import SystemResult, summarize
from asyncpp.bench.trace import RequestTrace
from asyncpp.core.sampling_params import SamplingParams

WARMUP_PROMPT_LEN, WARMUP_TOKENS = 16, 4


@dataclass(slots=True, frozen=True)
class PipelineSnapshot:
    """The engine's cumulative pipeline counters at one moment (it keeps updating its own)."""
    stage_busy_s: tuple[float, ...]
    active_s: float

    @classmethod
    def of(cls, engine: AsyncLLM) -> PipelineSnapshot | None:
        try:
            stats = engine.stats().pipeline
        except Exception:  # a backend without stats still gets timed
            return None
        return cls(tuple(stats.stage_busy_s), stats.active_s)


def busy_since(before: PipelineSnapshot | None, after: PipelineSnapshot | None
               ) -> tuple[list[float], float] | None:
    """Per-stage busy fractions and the bubble over the timed window only (warm-up excluded)."""
    if before is None or after is None:
        return None
    active = after.active_s - before.active_s
    busy = [a - b for a, b in zip(after.stage_busy_s, before.stage_busy_s)]
    fractions = [min(1.0, b / active) if active > 0 else 0.0 for b in busy]
    bubble = 1.0 - sum(fractions) / len(fractions) if fractions and active > 0 else 0.0
    return fractions, bubble


async def _consume(engine: AsyncLLM, prompt: list[int], params: SamplingParams, request_id: str,
                   trace: RequestTrace) -> None:
    trace.start = time.perf_counter()
    async for out in engine.generate({"prompt_token_ids": prompt}, params, request_id=request_id):
        trace.record(time.perf_counter(), len(out.outputs[0].token_ids))
        trace.token_ids = list(out.outputs[0].token_ids)


async def _warm_up(engine: AsyncLLM, prompt: list[int]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS, ignore_eos=True)
    async for _ in engine.generate({"prompt_token_ids": prompt[:WARMUP_PROMPT_LEN]}, params,
                                   request_id="bench-warmup"):
        pass
    await engine.reset_prefix_cache()  # the timed prompts start with the warm-up's tokens


async def run_asyncpp(layout: Layout, model: str, prompts: list[list[int]], output_len: int,
                      engine_kwargs: dict[str, Any]) -> SystemResult:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    kwargs = {**engine_kwargs, **layout.engine_kwargs(), "model": model, "skip_tokenizer_init": True}
    async with AsyncLLM(**kwargs) as engine:
        await _warm_up(engine, prompts[0])
        before = PipelineSnapshot.of(engine)
        traces = [RequestTrace() for _ in prompts]
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i, (prompt, trace) in enumerate(zip(prompts, traces)):
                tg.start_soon(_consume, engine, prompt, params, f"bench-{i}", trace)
        total = max(t.end for t in traces) - start
        window = busy_since(before, PipelineSnapshot.of(engine))
        pipeline = engine.stats().pipeline
        partition, source = engine.config.layer_partition, engine.config.layer_partition_source
        per_rank = engine.param_bytes_per_rank()
    result = summarize(layout.name, "asyncpp", traces, total)
    result.precision = layout.precision.label
    if window is not None:
        result.busy_fractions, result.bubble_fraction = window
    result.in_flight = (pipeline.in_flight_mean, pipeline.in_flight_max)
    result.layer_partition, result.layer_partition_source = partition, source
    tp = layout.tp
    result.stage_weight_mib = [max(per_rank[i:i + tp]) / 2**20 for i in range(0, len(per_rank), tp)]
    return result
