"""The routed SwiGLU experts of an MoE block packed for the compiled kernel (csrc/moe_impl.h).

Per expert, the gate/up weights become blocks of 32 gate columns beside the same 32 up
columns and the down weights blocks of 64 output columns, each block stored K-major. One
kernel call then runs a layer's routed experts: a work item streams one contiguous block
while the tokens routed to that expert pass over it, and silu(gate) * up, the routing weights
and the sum over experts happen in the same pass. At decode (a few tokens an expert) the
step reads each expert's weights once, near memory speed. On the MoE workload's shapes
(benchmarks/moe_layer.py, 2 threads, AVX512-BF16 host) against a prepacked oneDNN GEMM per
expert: 2.2x (fp32) and 3.9x (bf16) at a 32-token decode step, 1.7x at 256 tokens, 1.25x / 1.1x
at 2048. bf16 weights are stored in pairs along K where the CPU multiplies bf16 pairs.
"""
from __future__ import annotations

import torch

from asyncpp.model import kernels

GATE_UP_COLS = 32  # gate columns a block holds (and as many up columns)
DOWN_COLS = 64


def fits(device: torch.device | str, dtype: torch.dtype, hidden: int, inner: int) -> bool:
    """Whether this rank's experts can run on the kernel (CPU, float32 or bf16, whole blocks)."""
    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and hidden % DOWN_COLS == 0 and inner % GATE_UP_COLS == 0 and kernels.available())


def pack_gate_up(weight: torch.Tensor) -> torch.Tensor:
    """[experts, 2 * inner, hidden] ([gate; up] rows) -> [experts, inner / 32, hidden, 64]."""
    experts, rows, hidden = weight.shape
    blocks = rows // 2 // GATE_UP_COLS
    gate = weight[:, :rows // 2].reshape(experts, blocks, GATE_UP_COLS, hidden)
    up = weight[:, rows // 2:].reshape(experts, blocks, GATE_UP_COLS, hidden)
    return _in_pairs(torch.cat([gate, up], dim=2).transpose(2, 3))


def pack_down(weight: torch.Tensor) -> torch.Tensor:
    """[experts, hidden, inner] -> [experts, hidden / 64, inner, 64]."""
    experts, hidden, inner = weight.shape
    return _in_pairs(weight.reshape(experts, hidden // DOWN_COLS, DOWN_COLS, inner).transpose(2, 3))


def _in_pairs(blocks: torch.Tensor) -> torch.Tensor:
    """bf16 blocks [..., K, 64] -> [..., K / 2, 64, 2] where the kernels multiply bf16 pairs
    (AVX512-BF16: one instruction takes two K steps, twice fp32's arithmetic at prefill)."""
    if blocks.dtype != torch.bfloat16 or kernels.isa() != "avx512_bf16":
        return blocks.contiguous()
    *lead, depth, cols = blocks.shape
    return blocks.reshape(*lead, depth // 2, 2, cols).transpose(-1, -2).contiguous()


def routed_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                  chosen: torch.Tensor) -> torch.Tensor:
    """sum over each token's chosen experts of weight * down(silu(gate(x)) * up(x)), in x's dtype;
    a bf16 model's values rounded where transformers rounds them."""
    return torch.ops.asyncpp.moe_swiglu(x, gate_up, down, chosen, weights, x.dtype == torch.bfloat16)
