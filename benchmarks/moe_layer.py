"""The routed experts of the MoE workload's 8 layers (16 experts, top-2, hidden 512, expert
inner 512) at decode and prefill sizes: the packed kernel (asyncpp/model/packed_experts.py)
next to one prepacked oneDNN GEMM per expert (the path int8 experts and kernel-less builds
take), same weights and routing, interleaved rounds, medians.

    .venv/bin/python benchmarks/model_forward.py ...   # the whole step
    .venv/bin/python benchmarks/moe_layer.py --threads 2
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from asyncpp.model.moe import QWEN3_MOE_NAMES, SparseMoeBlock
from asyncpp.model.parallel import SingleRankGroup


def blocks(dtype: torch.dtype, layers: int, experts: int, hidden: int, inner: int, top_k: int
           ) -> tuple[list[SparseMoeBlock], list[SparseMoeBlock]]:
    """(per-expert oneDNN, packed) copies of the same random layers."""
    torch.manual_seed(0)
    per_expert, packed = [], []
    for _ in range(layers):
        block = SparseMoeBlock(hidden, inner, experts, top_k, True, SingleRankGroup(), QWEN3_MOE_NAMES)
        for p in block.parameters():
            p.data = (torch.randn(p.shape) / p.shape[-1] ** 0.5).to(dtype)
        twin = copy.deepcopy(block)
        twin.pack(None)
        for module in block.modules():
            if hasattr(module, "prepare"):
                module.prepare(None, False)
        per_expert.append(block)
        packed.append(twin)
    return per_expert, packed


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", default="32 256 2048", help="tokens a layer runs (32: a decode step)")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    print(f"torch threads: {ns.threads}; median ms for 8 MoE layers' routed experts, interleaved")
    print(f"{'dtype':>8} {'tokens':>7} {'per-expert oneDNN':>18} {'packed kernel':>14} {'speed-up':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        per_expert, packed = blocks(dtype, 8, 16, 512, 512, 2)
        for tokens in map(int, ns.tokens.split()):
            x = torch.randn(tokens, 512).to(dtype)
            old, new = [], []
            for _ in range(3):
                old.append(median_ms(lambda: [b.routed(x) for b in per_expert], ns.rounds))
                new.append(median_ms(lambda: [b.routed(x) for b in packed], ns.rounds))
            a, b = statistics.median(old), statistics.median(new)
            print(f"{str(dtype).removeprefix('torch.'):>8} {tokens:>7} {a:>18.2f} {b:>14.2f} {a / b:>8.2f}x")


if __name__ == "__main__":
    main()
