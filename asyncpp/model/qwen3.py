"""Qwen3: the Llama layers with an RMSNorm over each query and key head before rotary, and a
head_dim of its own (not hidden / heads). Qwen3-MoE: the same attention, sparse MoE blocks
(moe.py) in the layers `decoder_sparse_step` picks and `mlp_only_layers` does not name."""
from __future__ import annotations

from typing import Any

from torch import nn

from asyncpp.core.config import ModelShape
from asyncpp.model.llama import LlamaForCausalLM
from asyncpp.model.moe import QWEN3_MOE_NAMES, SparseMoeBlock
from asyncpp.model.parallel import TPGroup


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def mlp_block(self, cfg: Any, shape: ModelShape, tp: TPGroup, layer: int) -> nn.Module | None:
        if layer not in shape.moe_layers:
            return None  # a dense MLP of `intermediate_size`
        return SparseMoeBlock(shape.hidden_size, shape.expert_intermediate_size, shape.num_experts,
                              shape.experts_per_token, bool(cfg.norm_topk_prob), tp, QWEN3_MOE_NAMES)
