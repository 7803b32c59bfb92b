"""N-gram speculative decoding against plain decoding, side by side: chat prompts that copy
and edit a paragraph or a piece of code (n-gram lookup's best case), all in flight at once,
greedy, each request up to --max-tokens and ending where the model ends its answer (with
--ignore-eos each goes on to --max-tokens: past its answer the model writes free text that
n-grams seldom predict). The time after the last request's first token shows the decoding
alone (prompts are prefilled alike either way). Both engines stay up for the whole run and
take turns for --rounds interleaved rounds (one warm-up request each first); each row is the
median round. Outputs must be identical.

    python benchmarks/speculative.py                       # bundled model, P=2, 4 prompts, 160 tokens
    python benchmarks/speculative.py --max-tokens 64 --rounds 1 --pp 2
    python benchmarks/speculative.py --speculative-config '{"method": "ngram", "num_speculative_tokens": 5}'
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncpp import AsyncLLM, ChatPrompt, SamplingParams  # noqa: E402
from asyncpp.prompts import PromptInput  # noqa: E402

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}

PARAGRAPH = ("The harbour town wakes before the sun. Fishing boats slip out past the breakwater while the "
             "bakery on the corner pulls its first loaves from the oven, and the smell of bread drifts down "
             "to the quay where the gulls wait. By seven the market stalls are up, the ferry has sounded its "
             "horn twice, and the old clock above the post office is, as always, four minutes slow.")
CODE = ("def moving_average(values, window):\n"
        "    if window <= 0:\n"
        "        raise ValueError('window must be positive')\n"
        "    total = 0.0\n"
        "    averages = []\n"
        "    for i, value in enumerate(values):\n"
        "        total += value\n"
        "        if i >= window:\n"
        "            total -= values[i - window]\n"
        "        if i + 1 >= window:\n"
        "            averages.append(total / window)\n"
        "    return averages\n")
TASKS = [f"Repeat this paragraph exactly, but replace 'harbour' with 'river':\n\n{PARAGRAPH}",
         f"Rename the function to rolling_mean and keep everything else the same:\n\n{CODE}",
         f"Copy this text word for word:\n\n{PARAGRAPH}",
         f"Add a docstring to this function and return the full code:\n\n{CODE}"]


def chats(count: int) -> list[ChatPrompt]:
    return [ChatPrompt([{"role": "user", "content": TASKS[i % len(TASKS)]}]) for i in range(count)]


async def one_round(engine: AsyncLLM, prompts: list[PromptInput], params: SamplingParams, tag: str
                    ) -> tuple[float, float, list[list[int]]]:
    """(seconds in all, seconds after the last request's first token, each request's tokens)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    first: list[float] = []

    async def run(i: int) -> None:
        async for out in engine.generate(prompts[i], params, request_id=f"{tag}-{i}"):
            if not outputs[i]:
                first.append(time.perf_counter())
            outputs[i] = out.outputs[0].token_ids

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(run, i)
    end = time.perf_counter()
    return end - start, end - max(first), outputs


@dataclass(slots=True)
class Rounds:
    """Each engine's seconds per round (in all, and after the last first token) and last outputs."""
    times: dict[str, list[float]] = field(default_factory=dict)
    decode: dict[str, list[float]] = field(default_factory=dict)
    outputs: dict[str, list[list[int]]] = field(default_factory=dict)
    warm_s: dict[str, float] = field(default_factory=dict)  # each one's warm-up request

    def busy_s(self, name: str) -> float:
        """All the time `name` served, its warm-up too."""
        return self.warm_s[name] + sum(self.times[name])


async def take_turns(engines: dict[str, AsyncLLM], prompts: list[PromptInput], params: SamplingParams,
                     rounds: int) -> Rounds:
    """One warm-up request each, then `rounds` rounds in which the engines take turns."""
    result = Rounds({name: [] for name in engines}, {name: [] for name in engines})
    for name, engine in engines.items():
        warm = SamplingParams(temperature=0, max_tokens=8)
        result.warm_s[name] = (await one_round(engine, prompts[:1], warm, f"warm-{name}"))[0]
    for r in range(rounds):
        for name, engine in engines.items():
            seconds, decoding, result.outputs[name] = await one_round(engine, prompts, params, f"{name}-{r}")
            result.times[name].append(seconds)
            result.decode[name].append(decoding)
    return result


async def main(args: argparse.Namespace) -> dict[str, Any]:
    spec = json.loads(args.speculative_config) if args.speculative_config else NGRAM
    common = {"model": args.model, "pipeline_parallel_size": args.pp, "dtype": args.dtype}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    async with AsyncLLM(**common) as plain, AsyncLLM(**common, speculative_config=spec) as ngram:
        measured = await take_turns({"plain": plain, "ngram": ngram}, chats(args.concurrency), params, args.rounds)
        stats = ngram.stats().spec_decode
    times, decode, outputs = measured.times, measured.decode, measured.outputs
    tokens = sum(len(o) for o in outputs["plain"])
    row = {name: statistics.median(t) for name, t in times.items()}
    tail = {name: statistics.median(t) for name, t in decode.items()}
    assert stats is not None
    return {"tokens": tokens, "plain_s": row["plain"], "ngram_s": row["ngram"],
            "speedup": row["plain"] / row["ngram"], "plain_decode_s": tail["plain"], "ngram_decode_s": tail["ngram"],
            "decode_speedup": tail["plain"] / tail["ngram"], "identical": outputs["plain"] == outputs["ngram"],
            "acceptance_rate": stats.acceptance_rate, "mean_acceptance_length": stats.mean_acceptance_length,
            "drafts": stats.num_drafts, "speculative_config": spec}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ignore-eos", action="store_true", help="every request generates --max-tokens")
    parser.add_argument("--speculative-config", default=None, help=f"JSON (default {json.dumps(NGRAM)})")
    parser.add_argument("--json", default=None, help="write the result here too")
    args = parser.parse_args()
    result = anyio.run(main, args)
    print(f"P={args.pp}, {args.concurrency} prompts, {result['tokens']} tokens (at most {args.max_tokens} each"
          f"{', ignore_eos' if args.ignore_eos else ''}), greedy: "
          f"plain {result['plain_s']:.2f} s, n-gram {result['ngram_s']:.2f} s, speed-up {result['speedup']:.2f}x "
          f"(after the last first token: {result['plain_decode_s']:.2f} s vs {result['ngram_decode_s']:.2f} s, "
          f"{result['decode_speedup']:.2f}x), "
          f"identical outputs: {result['identical']}, acceptance rate {result['acceptance_rate']:.2f}, "
          f"mean acceptance length {result['mean_acceptance_length']:.2f} ({result['drafts']} drafts)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli()
