"""The machine's ceilings, measured in the bench run itself, and each row as a fraction of its own.

Measured: GEMM GFLOP/s in fp32, bf16 (F.linear) and int8 (fbgemm, as --quantization int8
runs) at a compute-bound shape (2048x512x2048) and at W's decode LM head (32x512x32000),
and memory bandwidth (summing a 256 MB tensor). A row's ceiling: its prompt FLOPs at the
compute-bound rate, then every decode step (all sequences in lockstep) at
max(FLOPs / rate, bytes read / bandwidth), where a step reads every weight once and each
sequence's KV; weight and KV bytes per element follow the row's precision. A bf16 row gets
the better of the fp32 and bf16 rates (an engine may run bf16 weights through either
kernel), an int8-weight row the better of that and the int8 rate.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig

from asyncpp.bench import BenchConfig, BenchReport, SystemResult, make_prompts
from asyncpp.core.config import ModelShape
from asyncpp.model.int8 import Int8Weight

_SHAPES = {"prefill": (2048, 512, 2048), "decode head": (32, 512, 32000)}
_BANDWIDTH_BYTES = 256 * 2**20


@dataclass(slots=True)
class Ceilings:
    gflops: dict[str, dict[str, float]]  # kind -> shape name -> GFLOP/s
    bandwidth_gbs: float


def _seconds(fn: Callable[[], object], min_s: float = 0.5) -> float:
    fn()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_s:
        fn()
        runs += 1
    return (time.perf_counter() - start) / runs


def _gemm(kind: str, m: int, k: int, n: int) -> Callable[[], object]:
    x, w = torch.randn(m, k), torch.randn(n, k) / k**0.5
    if kind == "int8":
        q = Int8Weight.quantize(w)
        return lambda: q.matmul(x, None)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[kind]
    x, w = x.to(dtype), w.to(dtype)
    return lambda: F.linear(x, w)


def measure_ceilings() -> Ceilings:
    gflops = {kind: {name: 2 * m * k * n / _seconds(_gemm(kind, m, k, n)) / 1e9
                     for name, (m, k, n) in _SHAPES.items()} for kind in ("fp32", "bf16", "int8")}
    data = torch.ones(_BANDWIDTH_BYTES // 4)
    bandwidth = _BANDWIDTH_BYTES / _seconds(data.sum) / 1e9
    return Ceilings(gflops, bandwidth)


@dataclass(slots=True)
class RowPrecision:
    weight_bytes: float
    kv_bytes: float
    rate_gflops: float

    @classmethod
    def of(cls, label: str, c: Ceilings) -> "RowPrecision":
        bf16 = label.startswith("bf16")
        rate = max(c.gflops["fp32"]["prefill"], c.gflops["bf16"]["prefill"]) if bf16 else c.gflops["fp32"]["prefill"]
        if "w=int8" in label:  # fbgemm's int8 GEMM, when it beats the activations' dtype
            rate = max(rate, c.gflops["int8"]["prefill"])
        weight = 1.0 if "w=int8" in label else 2.0 if bf16 else 4.0
        kv = 1.0 if "kv=fp8" in label else 2.0 if bf16 else 4.0
        return cls(weight, kv, rate)


def ceiling_tok_s(shape: ModelShape, prompt_lens: list[int], output_len: int, p: RowPrecision,
                  bandwidth_gbs: float) -> float:
    h, layers, kv_width = shape.hidden_size, shape.num_layers, shape.num_kv_heads * shape.head_dim
    layer_params = (h * (shape.num_heads * shape.head_dim + 2 * kv_width) + shape.num_heads * shape.head_dim * h
                    + 3 * h * shape.intermediate_size)
    head_params = shape.vocab_size * h
    rate, bandwidth = p.rate_gflops * 1e9, bandwidth_gbs * 1e9
    prefill = sum(2 * layers * layer_params * n + 2 * layers * h * n * n for n in prompt_lens) / rate
    weight_bytes = (layers * layer_params + head_params) * p.weight_bytes
    total = prefill
    for step in range(output_len):
        contexts = [n + step for n in prompt_lens]
        flops = len(contexts) * 2 * (layers * layer_params + head_params) + sum(4 * layers * h * c for c in contexts)
        read = weight_bytes + sum(2 * layers * kv_width * c for c in contexts) * p.kv_bytes
        total += max(flops / rate, read / bandwidth)
    return len(prompt_lens) * output_len / total


def ceiling_report(c: Ceilings, report: BenchReport, cfg: BenchConfig) -> str:
    """The measurements, the arithmetic, and every row's fraction of its ceiling."""
    hf = AutoConfig.from_pretrained(report.config["model"])
    shape = ModelShape.of(hf)
    prompts = make_prompts(cfg.num_requests, cfg.min_prompt_len, cfg.max_prompt_len, shape.vocab_size, cfg.seed)
    lens = [len(p) for p in prompts]
    rates = "; ".join(f"{kind}: " + ", ".join(f"{name} {g:.0f}" for name, g in shapes.items())
                      for kind, shapes in c.gflops.items())
    lines = [f"ceilings (measured in this run): GEMM GFLOP/s {rates}; memory {c.bandwidth_gbs:.1f} GB/s",
             "row ceiling = prompt FLOPs / GEMM rate + sum over decode steps of max(FLOPs / rate, "
             "(weights + KV) bytes / bandwidth)"]
    for r in report.results:
        if r.ok and r.kind in ("asyncpp", "vllm"):
            lines.append(_row_line(r, shape, lens, cfg.output_len, c))
    return "\n  ".join(lines)


def _row_line(r: SystemResult, shape: ModelShape, lens: list[int], output_len: int, c: Ceilings) -> str:
    p = RowPrecision.of(r.precision or "fp32", c)
    ceiling = ceiling_tok_s(shape, lens, output_len, p, c.bandwidth_gbs)
    return (f"{r.name}: {r.tokens_per_s:.0f} tok/s of ceiling {ceiling:.0f} = {r.tokens_per_s / ceiling:.2f} "
            f"(GEMM {p.rate_gflops:.0f} GFLOP/s, {p.weight_bytes:g} B/weight, {p.kv_bytes:g} B/KV element)")
