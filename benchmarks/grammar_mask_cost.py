"""What structured output costs per decode step, on the bundled SmolLM2's vocabulary (49152):

- fill: the virtual engine writing the next-token bitmask of each constrained sequence
  (GrammarState.fill_mask, in a worker thread), per sequence and per step of 32 sequences;
- apply: the last stage's sampler masking 32 rows of logits (`ops.masked_by_bitmask`), next to
  the copy it makes of the logits anyway;
- carry: pickling a 32-sequence microbatch with and without its bitmask (what the mp
  transport writes to each stage's control pipe).

Each matcher walks its grammar at random: every step it takes a token drawn uniformly from
those its mask allows, which visits more (and harder) grammar states than a model would.

    python benchmarks/grammar_mask_cost.py [--steps 100] [--rows 32]
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncpp.core.messages import Run  # noqa: E402
from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork  # noqa: E402
from asyncpp.core.sampling_params import SamplingParams  # noqa: E402
from asyncpp.core.structured_outputs import StructuredOutputsParams  # noqa: E402
from asyncpp.engine.grammar_compiler import compile_spec  # noqa: E402
from asyncpp.engine.grammar_state import GrammarState  # noqa: E402
from asyncpp.model.default_model import bundled_model_path  # noqa: E402
from asyncpp.worker import sampling_ops as ops  # noqa: E402
from benchmarks.serve_vs_vllm import SCHEMA  # noqa: E402

GRAMMARS = {
    "bench schema": StructuredOutputsParams(json=SCHEMA),
    "person schema": StructuredOutputsParams(json={
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                         "email": {"type": "string", "format": "email"},
                                         "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age", "email", "tags"]}),
    "json object": StructuredOutputsParams(json_object=True),
    "regex": StructuredOutputsParams(regex=r"[A-Z][a-z]{2,12}( [A-Z][a-z]{2,12}){0,3}, [0-9]{1,5} [a-z ]{5,40}"),
}


def walk(compiled: xgr.CompiledGrammar, rows: int, steps: int, vocab: int, rng: np.random.Generator
         ) -> tuple[list[float], list[np.ndarray]]:
    """Seconds per step to fill `rows` masks, and the masks of a few steps."""
    states = [GrammarState(compiled) for _ in range(rows)]
    times, masks = [], []
    words = -(-vocab // 32)
    for _ in range(steps):
        live = [s for s in states if s.constrains]
        if not live:
            break
        bitmask = np.zeros((len(live), words), dtype=np.int32)
        started = time.perf_counter()
        for row, state in enumerate(live):
            state.fill_mask(bitmask, row)
        times.append((time.perf_counter() - started) / len(live))
        masks.append(bitmask)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, count=vocab, bitorder="little")
        for row, state in enumerate(live):
            state.advance([int(rng.choice(np.flatnonzero(bits[row])))])
    return times, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    vocab = 49152
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    rng = np.random.default_rng(0)
    print(f"fill: us per sequence per step (mean / p99 / max), {args.rows} sequences walking at random")
    masks: list[np.ndarray] = []
    for name, params in GRAMMARS.items():
        compiled = compile_spec(compiler, params, params.spec(), 20)
        times, walked = walk(compiled, args.rows, args.steps, vocab, rng)
        masks += [m for m in walked if len(m) == args.rows]
        us = sorted(t * 1e6 for t in times)
        print(f"  {name:14s} {statistics.mean(us):7.1f} / {us[int(0.99 * (len(us) - 1))]:7.1f} / {us[-1]:7.1f}"
              f"   ({len(us)} steps)")
    bitmask = masks[len(masks) // 2]
    logits = torch.randn(args.rows, vocab)
    rows = list(range(args.rows))
    for name, fn in (("apply (unpack + where)", lambda: ops.masked_by_bitmask(logits, bitmask, rows)),
                     ("the sampler's logits copy", lambda: logits.clone())):
        fn()
        started = time.perf_counter()
        for _ in range(50):
            fn()
        print(f"{name}: {(time.perf_counter() - started) / 50 * 1e3:.2f} ms per step of {args.rows} rows")
    params = SamplingParams(temperature=1.0, max_tokens=128)
    seqs = [SeqWork(i, [5], 300 + i, list(range(20)), SampleSpec(params, None, 10, grammar_row=i))
            for i in range(args.rows)]
    for label, mb in (("without bitmask", MicroBatch(0, seqs)), ("with bitmask", MicroBatch(0, seqs, -1, bitmask))):
        started = time.perf_counter()
        for _ in range(200):
            data = pickle.dumps(Run(mb), protocol=pickle.HIGHEST_PROTOCOL)
        dumped = (time.perf_counter() - started) / 200
        started = time.perf_counter()
        for _ in range(200):
            pickle.loads(data)
        loaded = (time.perf_counter() - started) / 200
        print(f"carry {label}: {len(data)} bytes, pickle {dumped * 1e6:.0f} us, unpickle {loaded * 1e6:.0f} us")


if __name__ == "__main__":
    main()
