"""Throughput benchmark: several asyncpp layouts and Hugging Face `generate()`, side by side.

Every system runs in the same process and the same run, on the same token-id prompts, so
the ratios between rows are meaningful even on a noisy machine. Used by
`benchmarks/throughput.py` and `asyncpp bench`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_LAYOUTS = "p1 p2v2 p2v1"
_WARMUP_PROMPT_LEN, _WARMUP_TOKENS = 16, 4


# -- workload ------------------------------------------------------------------------
def default_workload_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "asyncpp" / "bench" / "w-llama"


def make_workload_model(path: str | Path | None = None) -> Path:
    """Workload W's model: a random 8-layer Llama (hidden 512, 8 heads, vocab 32000), fp32.

    Built once with a fixed seed and reused; written to a temporary folder first so an
    interrupted build never leaves a half-written cache behind.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path) if path is not None else default_workload_dir()
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=2048, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.2)  # sharp logits: greedy near-ties would make parity noisy
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
    return path


def make_prompts(count: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts with lengths uniform in [min_len, max_len], ids clear of 0..2 (pad/bos/eos)."""
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(count)]
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


# -- layouts -------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class Layout:
    pp: int = 1
    tp: int = 1
    ve: int | None = None  # None: the engine's default (V = P)
    partition: str | None = None  # layers per stage, None: the engine's default (even)

    @property
    def name(self) -> str:
        parts = [f"P={self.pp}"]
        if self.tp != 1:
            parts.append(f"T={self.tp}")
        if self.ve is not None and self.pp > 1:
            parts.append(f"V={self.ve}")
        name = ",".join(parts)
        return f"{name} [{self.partition}]" if self.partition else name

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs = {"pipeline_parallel_size": self.pp, "tensor_parallel_size": self.tp,
                  "num_virtual_engines": self.ve}
        return {**kwargs, "pp_layer_partition": self.partition} if self.partition else kwargs


def parse_layout(text: str) -> Layout:
    """'p2v2', 'P=2,V=2', 't2', 'p2t2', 'p2v2@5,3' (explicit layers per stage) -> Layout;
    letters p, t, v each once, any order."""
    text, at, partition = text.partition("@")
    if at and not re.fullmatch(r"\d+(,\d+)*", partition):
        raise ValueError(f"layout partition {partition!r}: expected layers per stage, e.g. @5,3")
    spec = text.lower().replace("=", "").replace(",", "").replace(" ", "")
    pairs = re.findall(r"([ptv])(\d+)", spec)
    if not pairs or "".join(k + n for k, n in pairs) != spec or len({k for k, _ in pairs}) != len(pairs):
        raise ValueError(f"layout {text!r}: expected letters p, t, v with sizes, e.g. p1, p2v2, t2, p2t2")
    sizes = {k: int(n) for k, n in pairs}
    if any(n < 1 for n in sizes.values()):
        raise ValueError(f"layout {text!r}: sizes must be >= 1")
    return Layout(pp=sizes.get("p", 1), tp=sizes.get("t", 1), ve=sizes.get("v"), partition=partition or None)


def parse_layouts(text: str) -> list[Layout]:
    layouts = [parse_layout(t) for t in text.replace(";", " ").split()]
    if not layouts:
        raise ValueError("--layouts needs at least one layout")
    return layouts


# -- per-request timing --------------------------------------------------------------
@dataclass(slots=True)
class RequestTrace:
    """When a request started and when each batch of its output tokens arrived."""
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


# -- results -------------------------------------------------------------------------
@dataclass(slots=True)
class SystemResult:
    name: str
    kind: str  # "asyncpp" | "hf" | "vllm"
    requests: int = 0
    output_tokens: int = 0
    total_s: float = 0.0
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    busy_fractions: list[float] | None = None
    bubble_fraction: float | None = None
    speedup_vs_hf: float | None = None
    ratio_vs_p1: float | None = None
    note: str = ""
    error: str | None = None
    runs_tok_s: list[float] = field(default_factory=list)  # every timed run, when repeated
    token_ids: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

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


# -- asyncpp -------------------------------------------------------------------------
async def _consume(engine: Any, prompt: list[int], params: Any, request_id: str, trace: RequestTrace) -> None:
    trace.start = time.perf_counter()
    async for out in engine.generate({"prompt_token_ids": prompt}, params, request_id=request_id):
        trace.record(time.perf_counter(), len(out.outputs[0].token_ids))
        trace.token_ids = list(out.outputs[0].token_ids)


def _pipeline_delta(before: Any, after: Any) -> tuple[list[float], float] | None:
    """Busy fractions and bubble over the timed window only (engine stats count since start)."""
    if before is None or after is None:
        return None
    from asyncpp.executor.base import PipelineStats

    window = PipelineStats(stage_busy_s=[a - b for a, b in zip(after.stage_busy_s, before.stage_busy_s)],
                           active_s=after.active_s - before.active_s)
    return window.busy_fractions, window.bubble_fraction


def _pipeline_stats(engine: Any) -> Any:
    """A copy of the engine's pipeline counters (the engine may keep updating its own object)."""
    from asyncpp.executor.base import PipelineStats

    try:
        stats = engine.stats().pipeline
    except Exception:  # a backend without stats still gets timed
        return None
    return PipelineStats(stage_busy_s=list(stats.stage_busy_s), active_s=stats.active_s)


async def run_asyncpp(layout: Layout, model: str, prompts: list[list[int]], output_len: int,
                      engine_kwargs: dict[str, Any]) -> SystemResult:
    """A fresh engine for this layout; one warm-up request; then every prompt at once."""
    import anyio

    from asyncpp import AsyncLLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    warmup = SamplingParams(temperature=0.0, max_tokens=_WARMUP_TOKENS, ignore_eos=True)
    kwargs = {**engine_kwargs, **layout.engine_kwargs(), "model": model, "skip_tokenizer_init": True}
    engine = AsyncLLM(**kwargs)
    async with engine:
        async for _ in engine.generate({"prompt_token_ids": prompts[0][:_WARMUP_PROMPT_LEN]}, warmup,
                                       request_id="bench-warmup"):
            pass
        before = _pipeline_stats(engine)
        traces = [RequestTrace() for _ in prompts]
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i, (prompt, trace) in enumerate(zip(prompts, traces)):
                tg.start_soon(_consume, engine, prompt, params, f"bench-{i}", trace)
        total = max(t.end for t in traces) - start
        delta = _pipeline_delta(before, _pipeline_stats(engine))
    result = summarize(layout.name, "asyncpp", traces, total)
    if delta is not None:
        result.busy_fractions, result.bubble_fraction = delta
    return result


# -- Hugging Face transformers -------------------------------------------------------
def _arrival_streamer(trace: RequestTrace) -> Any:
    """A transformers streamer that timestamps each generated token (its first put is the prompt)."""
    from transformers.generation.streamers import BaseStreamer

    class ArrivalStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.seen_prompt, self.count = False, 0

        def put(self, value: torch.Tensor) -> None:
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            self.count += value.numel()
            trace.record(time.perf_counter(), self.count)

        def end(self) -> None:
            pass

    return ArrivalStreamer()


def _hf_generate(model: Any, prompt: list[int], output_len: int, trace: RequestTrace | None) -> list[int]:
    ids = torch.tensor([prompt])
    streamer = _arrival_streamer(trace) if trace is not None else None
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=output_len, eos_token_id=None, pad_token_id=0,
                             streamer=streamer)  # runs through EOS like ignore_eos, never suppresses it
    return out[0, len(prompt):].tolist()


def run_hf(model_path: str, prompts: list[list[int]], output_len: int, threads: int) -> SystemResult:
    """transformers generate(), greedy, one request at a time (TTFT excludes queueing)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    _hf_generate(model, prompts[0][:_WARMUP_PROMPT_LEN], _WARMUP_TOKENS, None)
    traces = [RequestTrace() for _ in prompts]
    start = time.perf_counter()
    for prompt, trace in zip(prompts, traces):
        trace.start = time.perf_counter()
        trace.token_ids = _hf_generate(model, prompt, output_len, trace)
    return summarize("HF generate", "hf", traces, time.perf_counter() - start)


# -- the whole comparison ------------------------------------------------------------
@dataclass(slots=True)
class BenchConfig:
    model: str | None = None  # None: workload W (built once in the cache)
    num_requests: int = 32
    min_prompt_len: int = 64
    max_prompt_len: int = 256
    output_len: int = 128
    seed: int = 0
    layouts: list[Layout] = field(default_factory=lambda: parse_layouts(DEFAULT_LAYOUTS))
    hf_requests: int | None = None  # None: all; 0: skip HF
    hf_threads: int | None = None  # None: every core
    vllm_python: str | None = None  # an interpreter with vLLM installed: adds vLLM as a peer
    repeats: int = 1  # timed runs per asyncpp layout (interleaved) and per vLLM; rows show the median
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class BenchReport:
    config: dict[str, Any]
    results: list[SystemResult]
    parity: list[str]  # human-readable lines; empty: all identical
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "results": [r.to_json() for r in self.results],
                "parity_ok": not self.parity, "parity": self.parity, "notes": self.notes}


def run_benchmark(cfg: BenchConfig, log: Any = print) -> BenchReport:
    from transformers import AutoConfig

    from asyncpp.config import available_cores

    load_start = _load_average()
    model = str(cfg.model) if cfg.model else str(make_workload_model())
    vocab = AutoConfig.from_pretrained(model).vocab_size
    prompts = make_prompts(cfg.num_requests, cfg.min_prompt_len, cfg.max_prompt_len, vocab, cfg.seed)
    notes: list[str] = []
    if load_start is not None and load_start > 0.5 * available_cores():
        notes.append(f"load average {load_start:.1f} on {available_cores()} cores before the run: other processes "
                     "share the CPUs, so absolute figures are depressed and ratios noisy")
    results = _run_layouts(cfg, model, prompts, notes, log)
    if cfg.vllm_python:
        from asyncpp.bench_vllm import run_vllm

        log(f"[bench] vLLM via {cfg.vllm_python} ...")
        vllm = run_vllm(cfg.vllm_python, model, prompts, cfg.output_len, available_cores(), cfg.repeats)
        notes.append(f"{vllm.name}: {vllm.note}" if vllm.ok else f"vLLM skipped: {vllm.error}")
        results.append(vllm)
    hf_count = len(prompts) if cfg.hf_requests is None else min(cfg.hf_requests, len(prompts))
    if hf_count > 0:
        log(f"[bench] HF generate, {hf_count} request(s) one at a time ...")
        hf = run_hf(model, prompts[:hf_count], cfg.output_len, cfg.hf_threads or available_cores())
        if hf_count < len(prompts):
            hf.name = f"HF generate ({hf_count}/{len(prompts)} req)"
            notes.append(f"HF timed {hf_count} of {len(prompts)} requests: its tok/s is per-request "
                         f"normalized (all {len(prompts)} would take ~{hf.total_s * len(prompts) / hf_count:.1f} s)")
        results.append(hf)
    add_ratios(results)
    config = {"model": model, "num_requests": cfg.num_requests, "prompt_len": [cfg.min_prompt_len, cfg.max_prompt_len],
              "output_len": cfg.output_len, "seed": cfg.seed, "layouts": [l.name for l in cfg.layouts],
              "repeats": cfg.repeats,
              "hf_requests": hf_count, "engine_kwargs": cfg.engine_kwargs, "cores": available_cores(),
              "torch": torch.__version__,
              "load_avg_1m": [load_start, _load_average()], "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return BenchReport(config=config, results=results, parity=check_parity(results, cfg.output_len), notes=notes)


def _run_layouts(cfg: BenchConfig, model: str, prompts: list[list[int]], notes: list[str], log: Any
                 ) -> list[SystemResult]:
    """Every layout, `repeats` rounds interleaved (so a slow spell of the machine hits all of
    them alike); each layout's row is its median run by tokens/s."""
    import anyio

    runs: dict[Layout, list[SystemResult]] = {layout: [] for layout in cfg.layouts}
    for round_index in range(cfg.repeats):
        for layout in cfg.layouts:
            if runs[layout] and not runs[layout][-1].ok:
                continue  # rejected once, rejected again
            suffix = f" (round {round_index + 1}/{cfg.repeats})" if cfg.repeats > 1 else ""
            log(f"[bench] asyncpp {layout.name}{suffix} ...")
            try:
                result = anyio.run(run_asyncpp, layout, model, prompts, cfg.output_len, cfg.engine_kwargs)
            except Exception as exc:  # a layout the engine rejects is reported, not fatal
                result = SystemResult(name=layout.name, kind="asyncpp", error=f"{type(exc).__name__}: {exc}")
                notes.append(f"{layout.name} skipped: {result.error}")
            runs[layout].append(result)
    return [median_run(r) for r in runs.values()]


def median_run(runs: list[SystemResult]) -> SystemResult:
    """The run with the median tokens/s (a real run, so its latencies belong to it), carrying
    every run's tokens/s."""
    ok = sorted((r for r in runs if r.ok), key=lambda r: r.tokens_per_s)
    if not ok:
        return runs[-1]
    chosen = ok[(len(ok) - 1) // 2]
    chosen.runs_tok_s = [r.tokens_per_s for r in runs if r.ok]
    return chosen


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def add_ratios(results: list[SystemResult]) -> None:
    ok = [r for r in results if r.ok]
    hf = next((r for r in ok if r.kind == "hf"), None)
    p1 = next((r for r in ok if r.kind == "asyncpp" and r.name == "P=1"), None)
    for r in ok:
        if hf is not None and hf.tokens_per_s > 0:
            r.speedup_vs_hf = r.tokens_per_s / hf.tokens_per_s
        if p1 is not None and r.kind == "asyncpp" and p1.tokens_per_s > 0:
            r.ratio_vs_p1 = r.tokens_per_s / p1.tokens_per_s


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_parity(results: list[SystemResult], output_len: int) -> list[str]:
    """Greedy sanity check: every asyncpp layout (and HF, on its subset) gives the same ids."""
    ok = [r for r in results if r.ok]
    reference = next((r for r in ok if r.kind == "asyncpp"), None)
    if reference is None:
        return []
    problems: list[str] = []
    for i, ids in enumerate(reference.token_ids):
        if len(ids) != output_len:
            problems.append(f"{reference.name}: request {i} produced {len(ids)} tokens, expected {output_len}")
    for other in ok:
        if other is reference:
            continue
        bad = [i for i, (a, b) in enumerate(zip(reference.token_ids, other.token_ids)) if a != b]
        for i in bad[:5]:
            at = _first_difference(reference.token_ids[i], other.token_ids[i])
            problems.append(f"{other.name} vs {reference.name}: request {i} differs from token {at}")
        if len(bad) > 5:
            problems.append(f"{other.name} vs {reference.name}: {len(bad) - 5} more requests differ")
    return problems


# -- output --------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[SystemResult]) -> str:
    header = ["system", "reqs", "out tok", "total s", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
              "ITL p50 ms", "ITL p99 ms", "vs HF", "vs P=1", "stage busy", "bubble"]
    rows = [header]
    for r in results:
        if not r.ok:
            rows.append([r.name, "skipped"] + [""] * (len(header) - 2))
            continue
        busy = "/".join(f"{b:.2f}" for b in r.busy_fractions) if r.busy_fractions else "-"
        rows.append([r.name, str(r.requests), str(r.output_tokens), f"{r.total_s:.2f}", f"{r.tokens_per_s:.1f}",
                     _fmt(r.ttft_p50_ms, ".1f"), _fmt(r.ttft_p99_ms, ".1f"), _fmt(r.itl_p50_ms, ".2f"),
                     _fmt(r.itl_p99_ms, ".2f"), _fmt(r.speedup_vs_hf, ".2f") + ("x" if r.speedup_vs_hf else ""),
                     _fmt(r.ratio_vs_p1, ".2f"), busy, _fmt(r.bubble_fraction, ".2f")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_report(report: BenchReport) -> str:
    c = report.config
    lines = [f"model {c['model']}; {c['num_requests']} requests, prompt {c['prompt_len'][0]}..{c['prompt_len'][1]} "
             f"tokens, {c['output_len']} output tokens, greedy, ignore_eos; {c['cores']} cores, torch {c['torch']}",
             *([f"engine arguments for every layout: {c['engine_kwargs']}"] if c["engine_kwargs"] else []),
             "", format_table(report.results), ""]
    lines += [f"note: {n}" for n in report.notes]
    lines += [f"runs: {r.name}: " + ", ".join(f"{x:.1f}" for x in r.runs_tok_s) + " tok/s (median shown)"
              for r in report.results if len(r.runs_tok_s) > 1]
    if report.parity:
        bar = "!" * 72
        lines += [bar, "!!! GREEDY PARITY MISMATCH: outputs differ between systems !!!",
                  *(f"!!! {p}" for p in report.parity), bar]
    else:
        checked = [r.name for r in report.results if r.ok]
        lines.append(f"parity: identical greedy token ids across {', '.join(checked)}")
    return "\n".join(lines)


def write_plot(report: BenchReport, path: str | Path) -> str:
    if importlib.util.find_spec("matplotlib") is None:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib) — {path} not written"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report.results if r.ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.name for r in ok]
    left.bar(names, [r.tokens_per_s for r in ok], color="tab:blue")
    left.set_ylabel("output tokens/s")
    left.set_title("throughput")
    right.bar(names, [r.itl_p50_ms or 0 for r in ok], color="tab:orange", label="ITL p50")
    right.scatter(names, [r.itl_p99_ms or 0 for r in ok], color="black", zorder=3, label="ITL p99")
    right.set_ylabel("ms")
    right.set_title("inter-token latency")
    right.legend()
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# -- command line --------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from asyncpp.config import EngineArgs

    parser.add_argument("--num-requests", type=int, default=32, help="requests, all submitted at once")
    parser.add_argument("--min-prompt-len", type=int, default=64, help="shortest prompt (tokens)")
    parser.add_argument("--max-prompt-len", type=int, default=256, help="longest prompt (tokens)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (ignore_eos)")
    parser.add_argument("--bench-seed", type=int, default=0, help="seed of the prompt lengths and ids")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                        help="asyncpp layouts, e.g. 'p1 p2v2 p2v1 t2 p2t2 p2v2@5,3' (p: stages, t: TP, v: virtual engines, "
                             "@: layers per stage); "
                             "they set --pipeline-parallel-size, --tensor-parallel-size, --num-virtual-engines")
    parser.add_argument("--hf-requests", type=int, default=None,
                        help="time HF generate() on the first K requests only (0: skip HF; default all)")
    parser.add_argument("--hf-threads", type=int, default=None, help="torch threads for HF (default all cores)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each asyncpp layout (rounds interleaved) and of vLLM; each row is "
                             "the median run, and every run's tok/s is listed below the table")
    parser.add_argument("--vllm-python", default=None,
                        help="also run vLLM on the same prompts, with this interpreter (a venv where vllm is "
                             "installed; vLLM pins its own torch and transformers)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", dest="plot_out", default=None, help="write a PNG plot here (needs matplotlib)")
    engine = parser.add_argument_group("engine arguments (MODEL default: workload W, built once in the cache)")
    EngineArgs.add_cli_args(engine)


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="throughput/latency: asyncpp layouts vs HF generate(), side by side",
                                   description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run_bench)
    return parser


_LAYOUT_FIELDS = ("pipeline_parallel_size", "tensor_parallel_size", "num_virtual_engines")
_BENCH_FIXED_FIELDS = ("model", "skip_tokenizer_init")


def bench_config_from_args(ns: argparse.Namespace) -> BenchConfig:
    from asyncpp.config import EngineArgs

    args = EngineArgs.from_cli_args(ns)
    defaults = EngineArgs()
    engine_kwargs = {f.name: getattr(args, f.name) for f in fields(args)
                     if f.name not in _LAYOUT_FIELDS + _BENCH_FIXED_FIELDS
                     and getattr(args, f.name) != getattr(defaults, f.name)}
    return BenchConfig(model=args.model, num_requests=ns.num_requests, min_prompt_len=ns.min_prompt_len,
                       max_prompt_len=ns.max_prompt_len, output_len=ns.output_len, seed=ns.bench_seed,
                       layouts=parse_layouts(ns.layouts), hf_requests=ns.hf_requests, hf_threads=ns.hf_threads,
                       vllm_python=ns.vllm_python, repeats=ns.repeats, engine_kwargs=engine_kwargs)


def run_bench(ns: argparse.Namespace) -> int:
    cfg = bench_config_from_args(ns)
    if cfg.repeats < 1:
        raise SystemExit("bench: need --repeats >= 1")
    if cfg.num_requests < 1 or cfg.output_len < 1 or not 1 <= cfg.min_prompt_len <= cfg.max_prompt_len:
        raise SystemExit("bench: need --num-requests >= 1, --output-len >= 1 and 1 <= --min-prompt-len <= --max-prompt-len")
    report = run_benchmark(cfg)
    print(format_report(report))
    if ns.json_out:
        Path(ns.json_out).write_text(json.dumps(report.to_json(), indent=2))
        print(f"results written to {ns.json_out}")
    if ns.plot_out:
        print(write_plot(report, ns.plot_out))
    return 1 if report.parity else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="throughput", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))
