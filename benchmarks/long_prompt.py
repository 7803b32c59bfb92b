"""Time to first token of one long prompt: P=1, P=2 with the prompt in one chunk, P=2 with
the engine's default (chunks in flight on every stage at once). "stage busy" is
each stage's compute time for the prompt (median round).

Workload W's model (asyncpp/bench/workload.py), one prompt of --prompt-len random token
ids, max_tokens=1, greedy. Each system is one engine kept for the whole run; the systems
take turns for --rounds interleaved rounds (one warm-up request each first), and each
row is the median round.

    python benchmarks/long_prompt.py
    python benchmarks/long_prompt.py --prompt-len 2000 --rounds 5 --json ttft.json
    python benchmarks/long_prompt.py --partitions 4,4     # and P=2 with an even split
    python benchmarks/long_prompt.py --partitions 4,4 --budgets 256   # and smaller chunks
    python benchmarks/long_prompt.py --mixes 1:0      # and P=2 with `auto` balanced for prompts alone
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncpp import AsyncLLM, SamplingParams  # noqa: E402
from asyncpp.bench import make_prompts, make_workload_model  # noqa: E402


@dataclass(slots=True)
class System:
    name: str
    engine_kwargs: dict[str, Any]
    ttft_s: list[float] = field(default_factory=list)
    busy_s: list[list[float]] = field(default_factory=list)  # per round: each stage's compute seconds
    stats: str = ""


def systems(prompt_len: int, partitions: list[str], budgets: list[int], mixes: list[str]) -> list[System]:
    one_chunk = prompt_len + 16
    rows = [System("P=1", {"pipeline_parallel_size": 1}),
            System("P=2, one chunk", {"pipeline_parallel_size": 2, "max_num_batched_tokens": one_chunk}),
            System("P=2, default", {"pipeline_parallel_size": 2})]
    rows += [System(f"P=2, layers {p}", {"pipeline_parallel_size": 2, "pp_layer_partition": p})
             for p in partitions]
    rows += [System(f"P=2, auto for mix {m}", {"pipeline_parallel_size": 2, "pp_partition_mix": m}) for m in mixes]
    return rows + [System(f"P=2, {b}-token chunks{f', layers {p}' if p else ''}",
                          {"pipeline_parallel_size": 2, "max_num_batched_tokens": b,
                           **({"pp_layer_partition": p} if p else {})})
                   for b in budgets for p in [None, *partitions]]


async def ttft(engine: AsyncLLM, prompt: list[int], request_id: str) -> float:
    await engine.reset_prefix_cache()  # every round computes the whole prompt
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    async for _ in engine.generate({"prompt_token_ids": prompt}, params, request_id=request_id):
        pass
    return time.perf_counter() - start


async def run(args: argparse.Namespace) -> list[System]:
    model = str(make_workload_model())
    prompt = make_prompts(1, args.prompt_len, args.prompt_len, 32000, seed=args.seed)[0]
    rows = systems(args.prompt_len, args.partitions, args.budgets, args.mixes)
    async with AsyncExitStack() as stack:
        engines = []
        for row in rows:
            engine = await stack.enter_async_context(AsyncLLM(
                model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=args.prompt_len + 16,
                **row.engine_kwargs))
            await ttft(engine, prompt[:32], f"warmup-{row.name}")
            engines.append(engine)
        for round_ in range(args.rounds):
            for row, engine in zip(rows, engines):
                before = engine.stats().pipeline.stage_busy_s
                row.ttft_s.append(await ttft(engine, prompt, f"{row.name}-{round_}"))
                row.busy_s.append([b - a for a, b in zip(before, engine.stats().pipeline.stage_busy_s)])
        for row, engine in zip(rows, engines):
            p = engine.stats().pipeline
            row.stats = (f"layers {engine.config.layer_partition}, budget {engine.config.max_num_batched_tokens}, "
                         f"in flight max {p.in_flight_max}")
    return rows


def report(rows: list[System]) -> str:
    base = statistics.median(rows[0].ttft_s)
    one_chunk = statistics.median(rows[1].ttft_s)
    lines = ["| system | TTFT median ms (rounds) | vs P=1 | vs P=2 one chunk | stage busy ms | engine |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        median = statistics.median(row.ttft_s)
        runs = ", ".join(f"{t * 1000:.0f}" for t in row.ttft_s)
        busy = " / ".join(f"{statistics.median(stage) * 1000:.0f}" for stage in zip(*row.busy_s))
        lines.append(f"| {row.name} | {median * 1000:.0f} ({runs}) | {median / base:.2f} | "
                     f"{median / one_chunk:.2f} | {busy} | {row.stats} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partitions", nargs="*", default=[], help="also P=2 with these layer splits, e.g. 4,4")
    parser.add_argument("--budgets", nargs="*", type=int, default=[],
                        help="also P=2 with these chunk budgets (--max-num-batched-tokens), each partition too")
    parser.add_argument("--mixes", nargs="*", default=[],
                        help="also P=2 with `auto` for these prompt:generated mixes (--pp-partition-mix), e.g. 1:0")
    parser.add_argument("--json", help="also write the timings here")
    args = parser.parse_args()
    rows = anyio.run(run, args)
    print(report(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{"system": r.name, "ttft_s": r.ttft_s, "engine": r.stats}
                                               for r in rows], indent=2))


if __name__ == "__main__":
    main()
