"""The whole bench run: build the workload, time every layout (and any peers), compare them."""
from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import torch

from asyncpp.bench.engine_run import run_asyncpp
from asyncpp.bench.layout import DEFAULT_LAYOUTS, Layout, parse_layouts
from asyncpp.bench.machine import load_average, usable_cores
from asyncpp.bench.parity import check_parity
from asyncpp.bench.results import SystemResult, add_ratio_vs_p1, median_run
from asyncpp.bench.workload import WORKLOADS, make_prompts

Log = Callable[[str], Any]


@dataclass(slots=True)
class BenchConfig:
    model: str | None = None  # None: the workload's model (built once in the cache)
    workload: str = "w"  # WORKLOADS: "w" (a Llama) or "moe" (a Qwen3-MoE), when no model is given
    num_requests: int = 32
    min_prompt_len: int = 64
    max_prompt_len: int = 256
    output_len: int = 128
    seed: int = 0
    layouts: list[Layout] = field(default_factory=lambda: parse_layouts(DEFAULT_LAYOUTS))
    repeats: int = 1  # timed runs per layout (rounds interleaved); rows show the median
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Workload:
    """What every system runs: one model folder and the same token-id prompts, greedy."""
    model: str
    prompts: list[list[int]]
    output_len: int
    repeats: int
    cores: int


# Another system on the same workload, timed after the asyncpp layouts; it may add notes.
# benchmarks/throughput.py adds Hugging Face generate() and vLLM this way.
Peer = Callable[[Workload, list[str], Log], SystemResult]


@dataclass(slots=True)
class BenchReport:
    config: dict[str, Any]
    results: list[SystemResult]
    parity: list[str]  # human-readable lines; empty: all identical
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "results": [r.to_json() for r in self.results],
                "parity_ok": not self.parity, "parity": self.parity, "notes": self.notes}


def run_benchmark(cfg: BenchConfig, log: Log = print, peers: Sequence[Peer] = ()) -> BenchReport:
    load_start = load_average()
    workload = _workload(cfg)
    log(f"[bench] {len(workload.prompts)} requests on {workload.model}: {len(cfg.layouts)} layout(s) x "
        f"{cfg.repeats} timed run(s)" + (", then the peers" if peers else ""))
    notes = _load_notes(load_start, workload.cores)
    results = run_layouts(cfg, workload, notes, log)
    results += [peer(workload, notes, log) for peer in peers]
    add_ratio_vs_p1(results)
    config = {"model": workload.model, "workload": None if cfg.model else cfg.workload,
              "num_requests": cfg.num_requests,
              "prompt_len": [cfg.min_prompt_len, cfg.max_prompt_len], "output_len": cfg.output_len,
              "seed": cfg.seed, "layouts": [layout.name for layout in cfg.layouts], "repeats": cfg.repeats,
              "engine_kwargs": cfg.engine_kwargs, "cores": workload.cores, "torch": torch.__version__,
              "load_avg_1m": [load_start, load_average()], "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return BenchReport(config=config, results=results, parity=check_parity(results, cfg.output_len), notes=notes)


def _workload(cfg: BenchConfig) -> Workload:
    # transformers takes a second to import; `asyncpp --help` should not wait for it.
    from transformers import AutoConfig

    model = str(cfg.model) if cfg.model else str(WORKLOADS[cfg.workload]())
    vocab = AutoConfig.from_pretrained(model).vocab_size
    prompts = make_prompts(cfg.num_requests, cfg.min_prompt_len, cfg.max_prompt_len, vocab, cfg.seed)
    return Workload(model, prompts, cfg.output_len, cfg.repeats, usable_cores())


def _load_notes(load: float | None, cores: int) -> list[str]:
    if load is None or load <= 0.5 * cores:
        return []
    return [f"load average {load:.1f} on {cores} cores before the run: other processes share the CPUs, "
            "so absolute figures are depressed and ratios noisy"]


def run_layouts(cfg: BenchConfig, workload: Workload, notes: list[str], log: Log) -> list[SystemResult]:
    """Every layout, `repeats` rounds interleaved (so a slow spell of the machine hits all of
    them alike); each layout's row is its median run by tokens/s."""
    runs: dict[Layout, list[SystemResult]] = {layout: [] for layout in cfg.layouts}
    total, count = cfg.repeats * len(cfg.layouts), 0
    for round_index in range(cfg.repeats):
        for layout in cfg.layouts:
            count += 1
            if runs[layout] and not runs[layout][-1].ok:
                continue  # rejected once, rejected again
            suffix = f", round {round_index + 1}/{cfg.repeats}" if cfg.repeats > 1 else ""
            log(f"[bench] run {count}/{total}: asyncpp {layout.name}{suffix} ...")
            runs[layout].append(_run_layout(layout, workload, cfg.engine_kwargs, notes))
            log(f"[bench] {_outcome(runs[layout][-1])}")
    return [median_run(r) for r in runs.values()]


def _outcome(result: SystemResult) -> str:
    if not result.ok:
        return f"{result.name}: skipped ({result.error})"
    split = f", layers {result.layers}" if result.layer_partition_source else ""
    return (f"{result.name}: {result.tokens_per_s:.1f} tok/s, {result.output_tokens} tokens in {result.total_s:.1f} s"
            f"{split}")


def _run_layout(layout: Layout, workload: Workload, engine_kwargs: dict[str, Any], notes: list[str]
                ) -> SystemResult:
    try:
        return anyio.run(run_asyncpp, layout, workload.model, workload.prompts, workload.output_len,
                         engine_kwargs)
    except Exception as exc:  # a layout the engine rejects is reported, not fatal
        result = SystemResult(name=layout.name, kind="asyncpp", error=f"{type(exc).__name__}: {exc}")
        notes.append(f"{layout.name} skipped: {result.error}")
        return result
