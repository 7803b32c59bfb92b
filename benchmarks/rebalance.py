"""Live re-balancing on workload W at P=2: an engine started from a bad split with
--pp-rebalance next to the same bad split static and a good static split, side by side in
one run, each under the same steady load (a fixed number of clients, each sending its next
request as the last one ends) for a fixed time; output tokens/s per interval, the moves made
and their pauses, each stage's busy fraction over the first and the last interval.

    .venv/bin/python benchmarks/rebalance.py --duration 60 --clients 16 --cases 6,2:on 6,2 5,3
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from asyncpp.async_llm import AsyncLLM  # noqa: E402
from asyncpp.bench.engine_run import PipelineSnapshot, busy_since  # noqa: E402
from asyncpp.bench.workload import make_prompts, make_workload_model  # noqa: E402
from asyncpp.core.sampling_params import SamplingParams  # noqa: E402

VOCAB = 32000


@dataclass(slots=True)
class CaseResult:
    name: str
    tokens_per_interval: list[float] = field(default_factory=list)  # output tokens/s in each interval
    busy_first: list[float] = field(default_factory=list)
    busy_last: list[float] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)  # the split at the end of each interval
    moves: int = 0
    pause_ms: list[float] = field(default_factory=list)
    failed: int = 0


async def client(engine: AsyncLLM, prompts: itertools.cycle, params: SamplingParams, stop: anyio.Event,
                 result: CaseResult) -> None:
    while not stop.is_set():
        try:
            async for _ in engine.generate({"prompt_token_ids": next(prompts)}, params):
                pass
        except Exception:
            result.failed += 1


async def run_case(spec: str, model: str, args: argparse.Namespace) -> CaseResult:
    split, _, mode = spec.partition(":")
    rebalance = mode == "on"
    result = CaseResult(f"{split} {'re-balanced' if rebalance else 'static'}")
    prompts = itertools.cycle(make_prompts(256, 64, 256, VOCAB, seed=0))
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    async with AsyncLLM(model=model, pipeline_parallel_size=2, pp_layer_partition=split, skip_tokenizer_init=True,
                        pp_rebalance=rebalance, pp_rebalance_window=args.window) as engine:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for _ in range(args.clients):
                tg.start_soon(client, engine, prompts, params, stop, result)
            await measure(engine, args, result)
            stop.set()
            tg.cancel_scope.cancel()
        result.moves = engine.stats().rebalance.moves
    return result


async def measure(engine: AsyncLLM, args: argparse.Namespace, result: CaseResult) -> None:
    intervals = int(args.duration // args.interval)
    for i in range(intervals):
        tokens, snap, start = engine.stats().generation_tokens_total, PipelineSnapshot.of(engine), time.perf_counter()
        moves = engine.stats().rebalance.moves
        await anyio.sleep(args.interval)
        stats = engine.stats()
        result.tokens_per_interval.append((stats.generation_tokens_total - tokens) / (time.perf_counter() - start))
        result.splits.append(",".join(f"{p:g}" for p in stats.layer_partition))
        if stats.rebalance.moves > moves:
            result.pause_ms.append(stats.rebalance.last_pause_ms)
        window = busy_since(snap, PipelineSnapshot.of(engine))
        if window is not None and stats.rebalance.moves == moves:
            if not result.busy_first:
                result.busy_first = window[0]
            result.busy_last = window[0]


def report(results: list[CaseResult], interval: float) -> None:
    best = max(sum(r.tokens_per_interval) / len(r.tokens_per_interval) for r in results if "static" in r.name)
    print(f"| case | out tok/s, each {interval:g} s | mean | x best static | moves (pause ms) | final split | "
          "busy first -> last | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        mean = sum(r.tokens_per_interval) / len(r.tokens_per_interval)
        print(f"| {r.name} | {' '.join(f'{t:.0f}' for t in r.tokens_per_interval)} | {mean:.1f} | {mean / best:.2f} | "
              f"{r.moves} ({', '.join(f'{p:.0f}' for p in r.pause_ms)}) | {r.splits[-1]} | "
              f"{_fractions(r.busy_first)} -> {_fractions(r.busy_last)} | {r.failed} |")


def _fractions(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values) or "-"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["6,2:on", "6,2", "5,3"],
                        help="splits of W at P=2; ':on' adds --pp-rebalance")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per case")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds per reported interval")
    parser.add_argument("--clients", type=int, default=16, help="requests kept running")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--window", type=float, default=5.0, help="--pp-rebalance-window")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    logging.getLogger("asyncpp").setLevel(logging.INFO)  # the moves and their pauses
    model = str(make_workload_model())
    report([await run_case(spec, model, args) for spec in args.cases], args.interval)


if __name__ == "__main__":
    anyio.run(main)
