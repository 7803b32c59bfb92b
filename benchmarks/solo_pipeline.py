"""A light load at P > 1 on one CPU host: every core for a microbatch alone in the pipeline
(`solo_stage_threads`, the default) against each stage on its own share of the cores
(`--no-solo-stage-threads`: microbatches overlap across stages). Both engines stay up and take
turns for --rounds interleaved rounds at each concurrency; N streams of --max-tokens greedy
tokens each (ignore_eos), after one warm-up round. Rows: median ms per output token of a
stream, output tok/s, and the ratio.

    python benchmarks/solo_pipeline.py                                  # bundled model, P=2
    python benchmarks/solo_pipeline.py --concurrency "1 4 16 32" --rounds 3 --pp 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncpp import AsyncLLM, SamplingParams  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


async def one_round(engine: AsyncLLM, streams: int, max_tokens: int, tag: str) -> float:
    """Seconds for `streams` requests sent at once (prompts new to the prefix cache)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def run(i: int) -> None:
        async for _ in engine.generate(f"{tag}-{i}. {PROMPT}", params, request_id=f"{tag}-{i}"):
            pass

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(streams):
            tg.start_soon(run, i)
    return time.perf_counter() - start


async def main(args: argparse.Namespace) -> None:
    common = {"model": args.model, "pipeline_parallel_size": args.pp, "dtype": args.dtype}
    async with AsyncLLM(**common) as solo, AsyncLLM(**common, solo_stage_threads=False) as shared:
        engines = {"solo": solo, "shared": shared}
        print(f"P={args.pp}, {args.max_tokens} tokens a stream, medians of {args.rounds} interleaved rounds")
        print(f"{'streams':>8} {'solo ms/token':>14} {'shared ms/token':>16} {'solo tok/s':>11} "
              f"{'shared tok/s':>13} {'speed-up':>9}")
        for streams in (int(c) for c in args.concurrency.split()):
            times: dict[str, list[float]] = {name: [] for name in engines}
            for name, engine in engines.items():
                await one_round(engine, streams, 8, f"warm-{name}-{streams}")
            for r in range(args.rounds):
                for name, engine in engines.items():
                    times[name].append(await one_round(engine, streams, args.max_tokens, f"{name}-{streams}-{r}"))
            med = {name: statistics.median(t) for name, t in times.items()}
            per_token = {name: 1e3 * s / args.max_tokens for name, s in med.items()}
            rate = {name: streams * args.max_tokens / s for name, s in med.items()}
            print(f"{streams:>8} {per_token['solo']:>14.1f} {per_token['shared']:>16.1f} {rate['solo']:>11.1f} "
                  f"{rate['shared']:>13.1f} {med['shared'] / med['solo']:>8.2f}x")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", default="1 2 4 8 16 32")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    anyio.run(main, parser.parse_args())


if __name__ == "__main__":
    cli()
