"""`pp_layer_partition="auto"`: the split chosen from stage times measured at start-up, or
read from the profile cache; None when profiling fails (the caller falls back to the estimate)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from asyncpp.core.config import EngineConfig
from asyncpp.core.partition_choice import (
    PartitionChoice,
    TrafficMix,
    choose_partition,
    mix_cost,
    stage_seconds,
)
from asyncpp.core.rebalance_rule import Predict
from asyncpp.core.stage_profile import TimingTable
from asyncpp.core.stages import format_partition
from asyncpp.profile_cache import load_profile, profile_key, profile_path, store_profile
from asyncpp.worker.stage_profiler import measure, measure_isolated

Measure = Callable[[EngineConfig, int], TimingTable]
PROFILE_TIMEOUT_S = 300.0
# On a GPU a stage's weights must leave this share of its memory for the KV cache and activations.
MIN_FREE_SHARE = 0.1
log = logging.getLogger("asyncpp")


def default_measure(config: EngineConfig, threads: int) -> TimingTable:
    """On a CPU in this process (no start-up of a process of its own, the threads restored
    after); on a GPU in a spawned process, so the engine keeps no CUDA context or memory."""
    if config.device == "cpu":
        return measure(config, threads)
    return measure_isolated(config, threads, PROFILE_TIMEOUT_S)


def measured_partition(config: EngineConfig, measure_fn: Measure | None = None) -> PartitionChoice | None:
    """The split for `config`'s layout and traffic mix from its timing table (cached per model,
    layout and host); `measure_fn` (default: default_measure) makes a table when none is cached."""
    mix = TrafficMix(*config.partition_mix)
    threads = config.threads_per_rank * config.stages[0].tp_size  # a stage's ranks, timed as one
    key = profile_key(config, threads)
    table, started = load_profile(key), time.perf_counter()
    cached = table is not None
    if table is None:
        try:
            table = (measure_fn or default_measure)(config, threads)
        except Exception as exc:  # any failure leaves the engine its estimate, never stops it
            log.warning("layer partition: profiling the stages failed (%s: %s); balancing by the estimate "
                        "from bytes instead", type(exc).__name__, exc)
            return None
        store_profile(key, table)
    choice = choose_partition(table, config.stages[0].pp_size, mix, _capacity(config, table))
    _log_choice(table, choice, mix, f"cached in {profile_path(key)}" if cached
                else f"measured in {time.perf_counter() - started:.1f} s")
    return choice


def cached_predictor(config: EngineConfig) -> Predict | None:
    """Each stage's predicted time per request of `config`'s traffic mix under a split, from the
    cached timing table of its model, layout and host; None when none is cached (nothing is
    measured here)."""
    table = load_profile(profile_key(config, config.threads_per_rank * config.stages[0].tp_size))
    if table is None:
        return None
    mix = TrafficMix(*config.partition_mix)
    return lambda parts: stage_seconds(table, parts, lambda p: mix_cost(p, table, mix))


def _capacity(config: EngineConfig, table: TimingTable) -> float | None:
    """Bytes of weights one stage may hold: on a GPU a share of its T devices; on a CPU the
    stages share the host's memory, so the split does not change what fits."""
    if not table.device_bytes:
        return None
    usable = table.device_bytes * config.gpu_memory_utilization * (1 - MIN_FREE_SHARE)
    return usable * config.stages[0].tp_size


def _log_choice(table: TimingTable, choice: PartitionChoice, mix: TrafficMix, how: str) -> None:
    log.info("stage profile (%s; %d thread(s) a stage; decode step of %d sequences with %d tokens of context, "
             "prefill chunk of %d tokens; each piece's median):", how, table.threads, table.decode_seqs,
             table.decode_context, table.prefill_tokens)
    for line in table.describe():
        log.info("  %s", line)
    if not choice.fits_memory:
        log.warning("layer partition: no split fits every stage's memory; choosing by time alone")
    log.info("layer partition %s (auto: the split whose slowest stage is fastest, for a mix of %g:%g prompt:"
             "generated tokens); predicted ms per stage, decode %s, prefill %s", format_partition(choice.parts),
             mix.prompt_tokens, mix.output_tokens, _ms(choice.decode_s), _ms(choice.prefill_s))


def _ms(seconds: list[float]) -> str:
    return "/".join(f"{s * 1e3:.1f}" for s in seconds)
