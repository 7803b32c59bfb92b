"""gpt-oss: the Llama layer structure with q/k/v/o biases, per-head attention sinks, sliding
windows on alternate layers (`layer_types`), YaRN rotary, and a sparse MoE block in every
layer (transformers' GptOssMLP):

- the router is a linear with a bias; each token takes its top-k logits and softmaxes them;
- an expert's gate and up rows are interleaved (gate = even rows, up = odd) and biased; the
  activation is a clamped SwiGLU: gate clamped above at `swiglu_limit`, up to +-limit,
  (up + 1) * gate * sigmoid(alpha * gate) with alpha `swiglu_alpha`; the down projection has a
  bias too (added on TP rank 0 only, so the block's one all-reduce adds it once).

Expert weights come as the published MXFP4 tensors (`experts.gate_up_proj_blocks` / `_scales`
[experts, out, in / 32, ...], dequantized while each rank reads its slices, mxfp4.py) or as the
dense ones transformers writes (`experts.gate_up_proj` [experts, hidden, 2 * inner], transposed).
Under TP each rank holds rows [2a, 2b) of the interleaved gate/up (its slice a..b of the inner
dimension, gate and up alike) and columns a..b of the down projection.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from asyncpp.core.config import ModelShape
from asyncpp.model.gemm import linear
from asyncpp.model.linear import ColumnParallelLinear, RowParallelLinear
from asyncpp.model.llama import LlamaAttention, LlamaForCausalLM
from asyncpp.model.loader import TensorSlice, WeightPlan, WeightSource, whole
from asyncpp.model.moe import QWEN3_MOE_NAMES, Router, SparseMoeBlock
from asyncpp.model.parallel import TPGroup


class GptOssRouter(Router):
    def __init__(self, hidden: int, num_experts: int):
        super().__init__(hidden, num_experts)
        self.bias = nn.Parameter(torch.empty(num_experts), requires_grad=False)


class GptOssExpert(nn.Module):
    def __init__(self, hidden: int, inner: int, tp: TPGroup, alpha: float, limit: float):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [2 * inner], tp, bias=True)  # rows interleaved: gate, up
        self.down_proj = RowParallelLinear(inner, hidden, tp, bias=True)
        self.alpha, self.limit, self.adds_bias = alpha, limit, tp.rank == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.gate_up_proj.gemm_weight, self.gate_up_proj.bias)
        gate = gate_up[:, 0::2].clamp(max=self.limit)
        up = gate_up[:, 1::2].clamp(-self.limit, self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return linear((up + 1) * glu, self.down_proj.gemm_weight, self.down_proj.bias if self.adds_bias else None)


class GptOssMoeBlock(SparseMoeBlock):
    def __init__(self, cfg: Any, shape: ModelShape, tp: TPGroup):
        hidden, inner = shape.hidden_size, shape.expert_intermediate_size
        alpha, limit = float(getattr(cfg, "swiglu_alpha", 1.702)), float(getattr(cfg, "swiglu_limit", 7.0))
        super().__init__(hidden, inner, shape.num_experts, shape.experts_per_token, False, tp, QWEN3_MOE_NAMES,
                         gate=GptOssRouter(hidden, shape.num_experts),
                         expert=lambda: GptOssExpert(hidden, inner, tp, alpha, limit))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k router logits (bias included), softmaxed among themselves."""
        top, chosen = linear(x, self.gate.gemm_weight, self.gate.bias).topk(self.top_k, dim=-1)
        return torch.softmax(top, dim=-1), chosen

    def plan(self, prefix: str, name: str) -> WeightPlan:
        """`name`: the layer's `mlp.`."""
        plan = {f"{prefix}gate.{p}": whole(f"{name}router.{p}") for p in ("weight", "bias")}
        local = self.inner // self.tp.size
        a, b = self.tp.rank * local, (self.tp.rank + 1) * local
        experts = f"{name}experts."
        for e in range(len(self.experts)):
            ours = f"{prefix}experts.{e}."
            plan[f"{ours}gate_up_proj.weight"] = WeightSource(
                [TensorSlice(f"{experts}gate_up_proj_blocks", 0, 2 * a, 2 * b, expert=e, mxfp4=True)],
                fallback=WeightSource([TensorSlice(f"{experts}gate_up_proj", 1, 2 * a, 2 * b, True, expert=e)]))
            plan[f"{ours}gate_up_proj.bias"] = WeightSource(
                [TensorSlice(f"{experts}gate_up_proj_bias", 0, 2 * a, 2 * b, expert=e)])
            plan[f"{ours}down_proj.weight"] = WeightSource(
                [TensorSlice(f"{experts}down_proj_blocks", 1, a, b, expert=e, mxfp4=True)],
                fallback=WeightSource([TensorSlice(f"{experts}down_proj", 0, a, b, True, expert=e)]))
            plan[f"{ours}down_proj.bias"] = WeightSource([TensorSlice(f"{experts}down_proj_bias", expert=e)])
        return plan


class GptOssForCausalLM(LlamaForCausalLM):
    checkpoint_quantizations = ("mxfp4",)  # its experts' published format, dequantized while loading
    round_normalized = False  # transformers' GptOssRMSNorm: w * x in float32, rounded once

    def attention_block(self, cfg: Any, shape: ModelShape, tp: TPGroup, layer: int, window: int | None
                        ) -> nn.Module | None:
        qkv_bias, o_bias = self._biases(cfg)
        return LlamaAttention(shape, tp, qkv_bias, o_bias, window=window, sinks=True)

    def mlp_block(self, cfg: Any, shape: ModelShape, tp: TPGroup, layer: int) -> nn.Module | None:
        return GptOssMoeBlock(cfg, shape, tp)
