"""Prefix caching on a chat-like workload: many requests share a long system prompt.

--requests requests, each --prefix-len tokens of one of --prefixes system prompts, then a
question of its own (--question-len), --output-len tokens out, greedy; they arrive evenly
over --arrival-s seconds. Per model (W's 8-layer Llama and the bundled SmolLM2-135M) and
system: P=1 and P=2,V=2 with caching off and on, and at V=2 cache-aware vs least-loaded
placement; with --vllm-python, vLLM 0.32 (prefix caching on, its async engine) at P=1 on
the same arrivals. Every run starts with an empty cache. Rows: TTFT p50/p90, output tok/s
(output tokens / first arrival to last token), and the hit rate: cached prompt tokens over
the shareable ones (the system prompt's full blocks, every request).

    python benchmarks/prefix_cache.py --vllm-python VLLM_VENV/bin/python
    python benchmarks/prefix_cache.py --models w --prefixes 4 --rounds 3
    python benchmarks/prefix_cache.py --models w --zero-hit --rounds 3   # the cost of caching at 0% hits

--zero-hit: workload W instead (32 requests at once, random prompts of 64-256 tokens, 128
out), where nothing can hit: caching off vs on at P=1 and P=2,V=2.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncpp import AsyncLLM, SamplingParams  # noqa: E402
from asyncpp.bench import make_prompts, make_workload_model  # noqa: E402
from asyncpp.bench.machine import usable_cores  # noqa: E402
from asyncpp.bench.trace import percentile_ms  # noqa: E402
from asyncpp.model.default_model import bundled_model_path  # noqa: E402

VLLM_CHILD = Path(__file__).resolve().with_name("prefix_cache_vllm_child.py")
BLOCK = 16


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    offsets: list[float]  # arrival, seconds after the first
    output_len: int
    shareable: int  # prompt tokens a perfect cache would hold: every request's system prompt, in full blocks
    warmup: list[list[int]]


@dataclass(slots=True)
class Run:
    ttft_s: list[float]
    total_s: float
    output_tokens: int
    cached: int
    token_ids: list[list[int]]


@dataclass(slots=True)
class Row:
    model: str
    layout: str
    name: str
    engine_kwargs: dict[str, Any] | None  # None: vLLM
    runs: list[Run] = field(default_factory=list)
    error: str = ""

    def median(self, key: Any) -> float:
        return statistics.median(key(r) for r in self.runs)


def make_workload(args: argparse.Namespace, vocab: int) -> Workload:
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    systems = [tokens(args.prefix_len) for _ in range(args.prefixes)]
    prompts = [systems[i % args.prefixes] + tokens(args.question_len) for i in range(args.requests)]
    step = args.arrival_s / max(1, args.requests - 1)
    shareable = args.requests * (args.prefix_len // BLOCK) * BLOCK
    return Workload(prompts, [i * step for i in range(args.requests)], args.output_len, shareable,
                    [tokens(32) for _ in range(2)])


def make_zero_hit_workload(args: argparse.Namespace, vocab: int) -> Workload:
    prompts = make_prompts(32, 64, 256, vocab, seed=args.seed)
    return Workload(prompts, [0.0] * len(prompts), 128, 0, make_prompts(2, 32, 32, vocab, seed=args.seed + 1))


def zero_hit_rows(model: str) -> list[Row]:
    p2 = {"pipeline_parallel_size": 2, "num_virtual_engines": 2}
    return [Row(model, "P=1", "caching off", {"enable_prefix_caching": False}), Row(model, "P=1", "caching on", {}),
            Row(model, "P=2 V=2", "caching off", {**p2, "enable_prefix_caching": False}),
            Row(model, "P=2 V=2", "caching on", p2)]


def rows_for(model: str, vllm: bool) -> list[Row]:
    p2 = {"pipeline_parallel_size": 2, "num_virtual_engines": 2}
    rows = [Row(model, "P=1", "caching off", {"enable_prefix_caching": False}),
            Row(model, "P=1", "caching on", {}),
            Row(model, "P=2 V=2", "caching off", {**p2, "enable_prefix_caching": False}),
            Row(model, "P=2 V=2", "on, least-loaded placement", {**p2, "cache_aware_placement": False}),
            Row(model, "P=2 V=2", "on, cache-aware placement", p2)]
    return rows + ([Row(model, "vLLM P=1", "caching on", None)] if vllm else [])


async def run_asyncpp(engine: AsyncLLM, w: Workload) -> Run:
    await engine.reset_prefix_cache()
    hits_before = engine.stats().prefix_cache_hits
    params = SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True)
    ttft, ends, ids = [0.0] * len(w.prompts), [0.0] * len(w.prompts), [[] for _ in w.prompts]
    start = time.perf_counter()

    async def one(i: int) -> None:
        await anyio.sleep(max(0.0, start + w.offsets[i] - time.perf_counter()))
        sent = time.perf_counter()
        async for out in engine.generate({"prompt_token_ids": w.prompts[i]}, params):
            if not ttft[i]:
                ttft[i] = time.perf_counter() - sent
            ids[i] = out.outputs[0].token_ids
        ends[i] = time.perf_counter() - start

    async with anyio.create_task_group() as tg:
        for i in range(len(w.prompts)):
            tg.start_soon(one, i)
    return Run(ttft, max(ends), sum(map(len, ids)), engine.stats().prefix_cache_hits - hits_before, ids)


async def measure_asyncpp(model_dir: str, rows: list[Row], w: Workload, rounds: int, max_len: int) -> None:
    """One engine per row, kept for every round; the rows take turns in each round."""
    async with AsyncExitStack() as stack:
        engines = []
        for row in rows:
            engine = await stack.enter_async_context(AsyncLLM(
                model=model_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=max_len,
                **row.engine_kwargs))
            engines.append(engine)
            for prompt in w.warmup:
                async for _ in engine.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=4)):
                    pass
        for _ in range(rounds):
            for row, engine in zip(rows, engines):
                row.runs.append(await run_asyncpp(engine, w))


def measure_vllm(python: str, model_dir: str, row: Row, w: Workload, rounds: int) -> None:
    job = {"model": model_dir, "prompts": w.prompts, "offsets": w.offsets, "output_len": w.output_len,
           "cores": usable_cores(), "warmup": w.warmup}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="asyncpp-vllm-") as tmp:
            job_path, result_path = Path(tmp, "job.json"), Path(tmp, "result.json")
            job_path.write_text(json.dumps(job))
            proc = subprocess.run([python, str(VLLM_CHILD), str(job_path), str(result_path)], cwd=tmp,
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not result_path.exists():
                row.error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                return
            data = json.loads(result_path.read_text())
        reqs = data["requests"]
        row.layout = f"vLLM {data['version']} P=1"
        row.runs.append(Run([r["ttft_s"] for r in reqs], max(r["end_s"] for r in reqs),
                            sum(len(r["token_ids"]) for r in reqs), sum(r["cached"] for r in reqs),
                            [r["token_ids"] for r in reqs]))


def report(rows: list[Row], w: Workload) -> str:
    lines = ["| model | layout | system | TTFT p50 ms | TTFT p90 ms | output tok/s | hit rate | vs caching off |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    off = {(r.model, r.layout): r for r in rows if r.name == "caching off" and r.runs}
    for row in rows:
        if row.error or not row.runs:
            lines.append(f"| {row.model} | {row.layout} | {row.name} | failed: {row.error} | | | | |")
            continue
        ttft50, ttft90, tps = _ttft(row, 50), _ttft(row, 90), _tps(row)
        hit = row.median(lambda r: r.cached / w.shareable) if w.shareable else 0.0
        base = off.get((row.model, row.layout))
        vs = ("" if base is None or base is row
              else f"TTFT {_ttft(base, 50) / ttft50:.1f}x lower, tok/s {tps / _tps(base):.2f}x")
        lines.append(f"| {row.model} | {row.layout} | {row.name} | {ttft50:.0f} | {ttft90:.0f} | {tps:.1f} | "
                     f"{hit:.3f} | {vs} |")
    return "\n".join(lines)


def _ttft(row: Row, q: float) -> float:
    return row.median(lambda r: percentile_ms(r.ttft_s, q))


def _tps(row: Row) -> float:
    return row.median(lambda r: r.output_tokens / r.total_s)


def parity_notes(rows: list[Row]) -> list[str]:
    """Greedy outputs of every system against the first one of its model (fp32: should match)."""
    notes, first = [], {}
    for row in rows:
        if not row.runs:
            continue
        ref = first.setdefault(row.model, row.runs[0].token_ids)
        same = sum(a == b for run in row.runs for a, b in zip(run.token_ids, ref))
        total = sum(len(run.token_ids) for run in row.runs)
        notes.append(f"{row.model} / {row.layout}, {row.name}: {same}/{total} outputs equal to the first row's")
    return notes


def model_dir(name: str) -> str:
    return str(make_workload_model() if name == "w" else bundled_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="w,bundled", help="comma-separated: w, bundled")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--prefixes", type=int, default=1, help="distinct system prompts, used in turn")
    parser.add_argument("--question-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--arrival-s", type=float, default=2.0, help="requests arrive evenly over this long")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-python", help="an interpreter with vLLM 0.32 installed (adds its P=1 row)")
    parser.add_argument("--zero-hit", action="store_true", help="workload W with random prompts instead (see above)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    from transformers import AutoConfig

    rows: list[Row] = []
    workload = None
    for name in args.models.split(","):
        path = model_dir(name)
        vocab = AutoConfig.from_pretrained(path).vocab_size
        workload = make_zero_hit_workload(args, vocab) if args.zero_hit else make_workload(args, vocab)
        model_rows = zero_hit_rows(name) if args.zero_hit else rows_for(name, bool(args.vllm_python))
        max_len = max(map(len, workload.prompts)) + workload.output_len + 16
        anyio.run(measure_asyncpp, path, [r for r in model_rows if r.engine_kwargs is not None], workload,
                  args.rounds, max_len)
        for row in model_rows:
            if row.engine_kwargs is None:
                measure_vllm(args.vllm_python, path, row, workload, args.rounds)
        rows += model_rows
        print(report(model_rows, workload), flush=True)
    print()
    print(report(rows, workload))
    print("\n".join(parity_notes(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps([{"model": r.model, "system": r.name, "error": r.error,
                                                "runs": [{"ttft_s": x.ttft_s, "total_s": x.total_s,
                                                          "output_tokens": x.output_tokens, "cached": x.cached}
                                                         for x in r.runs]} for r in rows], indent=2))


if __name__ == "__main__":
    main()
