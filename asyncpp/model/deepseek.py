"""DeepSeek-V3 (and V2): the Llama layer structure with multi-head latent attention (mla.py),
dense MLPs in the first `first_k_dense_replace` layers and, after them, a sparse MoE block
(moe.py) with `n_shared_experts` shared experts beside the routed ones.

Routing, as transformers 5.25: V3 scores each expert with a sigmoid of the float32 router
logits, picks the `topk_group` best of `n_group` groups by the sum of each group's two best
scores plus `e_score_correction_bias`, then the top-k experts within them (by score plus
bias); the weights are the plain scores, renormalised if `norm_topk_prob`, times
`routed_scaling_factor`. V2 scores with a softmax and picks the top-k of all experts
(`greedy`) or within the `topk_group` groups whose best expert scores highest
(`group_limited_greedy`), weights times `routed_scaling_factor`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from asyncpp.core.config import ModelShape
from asyncpp.model.gemm import linear
from asyncpp.model.llama import LlamaForCausalLM
from asyncpp.model.loader import WeightPlan, whole
from asyncpp.model.mla import LatentAttention
from asyncpp.model.moe import QWEN3_MOE_NAMES, Router, SparseMoeBlock
from asyncpp.model.parallel import TPGroup


class DeepseekV3Router(Router):
    """float32 gate weights (transformers keeps them so) and the per-expert choice bias."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__(hidden, num_experts, torch.float32)
        self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts, dtype=torch.float32),
                                                    requires_grad=False)


class DeepseekMoeBlock(SparseMoeBlock):
    def __init__(self, cfg: Any, shape: ModelShape, tp: TPGroup, v3: bool):
        experts = shape.num_experts
        gate = DeepseekV3Router(shape.hidden_size, experts) if v3 else Router(shape.hidden_size, experts, torch.float32)
        super().__init__(shape.hidden_size, shape.expert_intermediate_size, experts, shape.experts_per_token,
                         bool(getattr(cfg, "norm_topk_prob", False)) and v3, tp, QWEN3_MOE_NAMES,
                         shape.shared_expert_intermediate_size, gate)
        self.v3 = v3
        self.groups = getattr(cfg, "n_group", None) or 1
        self.topk_groups = getattr(cfg, "topk_group", None) or self.groups
        self.group_limited = v3 or getattr(cfg, "topk_method", "greedy") == "group_limited_greedy"
        self.scaling = float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(x.float(), self.gate.gemm_weight)
        scores = logits.sigmoid() if self.v3 else logits.softmax(dim=-1)
        choice = scores + self.gate.e_score_correction_bias if self.v3 else scores
        if self.group_limited:
            choice = self._within_best_groups(choice)
        chosen = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scaling).to(x.dtype), chosen

    def _within_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """`choice` outside the `topk_group` best groups: -inf (V3) or 0 (V2), as transformers."""
        grouped = choice.view(choice.shape[0], self.groups, -1)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if self.v3 else grouped.amax(dim=-1)
        best = group_scores.topk(self.topk_groups, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        fill = float("-inf") if self.v3 else 0.0
        return grouped.masked_fill(~keep.unsqueeze(-1), fill).view_as(choice)

    def plan(self, prefix: str, name: str) -> WeightPlan:
        plan = super().plan(prefix, name)
        if self.v3:
            plan[f"{prefix}gate.e_score_correction_bias"] = whole(f"{name}gate.e_score_correction_bias")
        return plan


class DeepseekV3ForCausalLM(LlamaForCausalLM):
    v3 = True

    def attention_block(self, cfg: Any, shape: ModelShape, tp: TPGroup, layer: int, window: int | None
                        ) -> nn.Module | None:
        return LatentAttention(cfg, shape, tp)

    def mlp_block(self, cfg: Any, shape: ModelShape, tp: TPGroup, layer: int) -> nn.Module | None:
        if layer not in shape.moe_layers:
            return None  # a dense MLP of `intermediate_size`
        return DeepseekMoeBlock(cfg, shape, tp, self.v3)


class DeepseekV2ForCausalLM(DeepseekV3ForCausalLM):
    v3 = False
