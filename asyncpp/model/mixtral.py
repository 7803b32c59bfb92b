"""Mixtral: the Llama layers with a sparse MoE block (moe.py) in every layer; the top-k
weights are a softmax over the chosen experts."""
from __future__ import annotations

from typing import Any

from torch import nn

from asyncpp.core.config import ModelShape
from asyncpp.model.llama import LlamaForCausalLM
from asyncpp.model.moe import MIXTRAL_NAMES, SparseMoeBlock
from asyncpp.model.parallel import TPGroup


class MixtralForCausalLM(LlamaForCausalLM):
    def mlp_block(self, cfg: Any, shape: ModelShape, tp: TPGroup, layer: int) -> nn.Module | None:
        return SparseMoeBlock(shape.hidden_size, shape.expert_intermediate_size, shape.num_experts,
                              shape.experts_per_token, True, tp, MIXTRAL_NAMES)
