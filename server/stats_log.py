"""One line about the engine every few seconds, as vLLM prints: throughput, queues, KV use,
pipeline bubble. Quiet while the engine stays idle (one line says it went idle)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio

from asyncpp.async_llm import EngineStats

logger = logging.getLogger("asyncpp.server.stats")


def stats_line(before: EngineStats, now: EngineStats, elapsed_s: float) -> str:
    prompt = (now.prompt_tokens_total - before.prompt_tokens_total) / elapsed_s
    generation = (now.generation_tokens_total - before.generation_tokens_total) / elapsed_s
    return (f"Avg prompt throughput: {prompt:.1f} tokens/s, Avg generation throughput: {generation:.1f} tokens/s, "
            f"Running: {now.num_running} reqs, Waiting: {now.num_waiting} reqs, "
            f"KV cache usage: {100 * now.kv_usage:.1f}%, Prefix cache hit rate: {100 * _hit_rate(before, now):.1f}%, "
            f"Pipeline bubble: {100 * now.pipeline.bubble_fraction:.1f}%")


def spec_decode_line(before: EngineStats, now: EngineStats) -> str | None:
    """vLLM's "SpecDecoding metrics" line over the interval; None without drafts in it."""
    if before.spec_decode is None or now.spec_decode is None:
        return None
    d = now.spec_decode.since(before.spec_decode)
    if not d.num_drafts:
        return None
    per_position = ", ".join(f"{n / d.num_drafts:.3f}" for n in d.accepted_per_position)
    return (f"SpecDecoding metrics: Mean acceptance length: {d.mean_acceptance_length:.2f}, Accepted: "
            f"{d.num_accepted_tokens} tokens, Drafted: {d.num_draft_tokens} tokens, Per-position acceptance rate: "
            f"{per_position}, Avg Draft acceptance rate: {100 * d.acceptance_rate:.1f}%"
            + (f", Draft model time: {d.draft_seconds:.2f} s" if now.spec_decode.draft_seconds else ""))


def _hit_rate(before: EngineStats, now: EngineStats) -> float:
    queries = now.prefix_cache_queries - before.prefix_cache_queries
    return (now.prefix_cache_hits - before.prefix_cache_hits) / queries if queries else 0.0


def _idle(before: EngineStats, now: EngineStats) -> bool:
    return (now.num_running == now.num_waiting == 0 and now.prompt_tokens_total == before.prompt_tokens_total
            and now.generation_tokens_total == before.generation_tokens_total)


async def log_stats_every(interval_s: float, stats: Callable[[], EngineStats]) -> None:
    """Runs until cancelled."""
    before, since, was_idle = stats(), time.monotonic(), False
    while True:
        await anyio.sleep(interval_s)
        now, at = stats(), time.monotonic()
        idle = _idle(before, now)
        if not (idle and was_idle):
            logger.info("%s", stats_line(before, now, max(at - since, 1e-9)))
            if (spec := spec_decode_line(before, now)) is not None:
                logger.info("%s", spec)
        before, since, was_idle = now, at, idle
