"""Draft-model speculative decoding against plain decoding, side by side, on a tiny target/draft
pair built here (random weights, seconds): the target is a Llama of --layers layers in which the
layers after the first --draft-layers write small updates into the residual stream (scaled by
--damping), and the draft is its embeddings, first --draft-layers layers, norm and head. So the
draft agrees with the target often, as a trained draft does, at a fraction of its cost. Random
token prompts, all in flight at once, greedy; both engines stay up and take turns for --rounds
rounds (one warm-up request each first); each row is the median round. Outputs must be identical.

    python benchmarks/speculative_draft.py                 # P=2, 4 prompts x 64 tokens, k=4
    python benchmarks/speculative_draft.py --pp 1 --k 3 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncpp import AsyncLLM, SamplingParams  # noqa: E402
from asyncpp.prompts import PromptInput  # noqa: E402
from benchmarks.speculative import take_turns  # noqa: E402


def make_pair(folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The target and its draft, saved as Hugging Face folders."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 128, max_position_embeddings=1024,
                         initializer_range=0.05, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers[args.draft_layers:]:
            layer.self_attn.o_proj.weight.mul_(args.damping)
            layer.mlp.down_proj.weight.mul_(args.damping)
    model.save_pretrained(folder / "target")
    del model.model.layers[args.draft_layers:]
    model.config.num_hidden_layers = args.draft_layers
    model.save_pretrained(folder / "draft")
    return folder / "target", folder / "draft"


def prompts(args: argparse.Namespace) -> list[PromptInput]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(3, args.vocab) for _ in range(rng.randint(32, 96))]}
            for _ in range(args.concurrency)]


async def compare(target: Path, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    common = {"model": str(target), "pipeline_parallel_size": args.pp, "dtype": "float32",
              "skip_tokenizer_init": True, "pp_layer_partition": "cost"}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    async with AsyncLLM(**common) as plain, AsyncLLM(**common, speculative_config=spec) as drafted:
        measured = await take_turns({"plain": plain, "draft": drafted}, prompts(args), params, args.rounds)
        stats = drafted.stats().spec_decode
    assert stats is not None
    times, outputs = measured.times, measured.outputs
    row = {name: statistics.median(t) for name, t in times.items()}
    return {"tokens": sum(len(o) for o in outputs["plain"]), "plain_s": row["plain"], "draft_s": row["draft"],
            "speedup": row["plain"] / row["draft"], "identical": outputs["plain"] == outputs["draft"],
            "acceptance_rate": stats.acceptance_rate, "mean_acceptance_length": stats.mean_acceptance_length,
            "drafts": stats.num_drafts,
            "draft_share": stats.draft_seconds / measured.busy_s("draft"),
            "speculative_config": spec}


def table(args: argparse.Namespace, r: dict[str, Any]) -> str:
    head = (f"P={args.pp}, target {args.layers} layers x {args.hidden} wide, draft its first {args.draft_layers}, "
            f"{args.concurrency} prompts x {args.max_tokens} tokens, greedy, k={args.k}, median of {args.rounds}")
    rows = [("plain", f"{r['plain_s']:.2f}", "1.00x", "-", "-", "-"),
            ("draft model", f"{r['draft_s']:.2f}", f"{r['speedup']:.2f}x", f"{r['acceptance_rate']:.2f}",
             f"{r['mean_acceptance_length']:.2f}", f"{100 * r['draft_share']:.0f}%")]
    names = ("engine", "time s", "speed-up", "acceptance", "mean accept len", "draft time")
    widths = [max(len(x) for x in col) for col in zip(names, *rows)]
    lines = [head, "  ".join(n.ljust(w) for n, w in zip(names, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines + [f"identical outputs: {r['identical']} ({r['drafts']} drafts)"])


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--draft-layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the result here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        target, draft = make_pair(Path(folder), args)
        spec = {"model": str(draft), "num_speculative_tokens": args.k}
        result = anyio.run(compare, target, spec, args)
    print(table(args, result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli()
