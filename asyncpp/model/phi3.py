"""Phi-3 (and Phi-4-mini): the Llama layers, with q, k and v fused in one `qkv_proj` tensor
and gate and up in one `gate_up_proj` in the checkpoint; each TP rank reads its rows of them.
Rotary: default, or `longrope` within `original_max_position_embeddings` (its short factors:
one static table), optionally over part of each head (`partial_rotary_factor`)."""
from __future__ import annotations

from asyncpp.model.linear import ColumnParallelLinear
from asyncpp.model.llama import LlamaForCausalLM
from asyncpp.model.loader import Checkpoint, WeightPlan, WeightSource, rows


class Phi3ForCausalLM(LlamaForCausalLM):
    def weight_plan(self, ckpt: Checkpoint) -> WeightPlan:
        plan = super().weight_plan(ckpt)
        heads, kv_heads = self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        for i, layer in enumerate(self.layers):
            prefix, name = f"layers.{i}.", f"model.layers.{self.stage.layer_start + i}."
            if layer.self_attn is not None:
                plan.update(layer.self_attn.qkv_proj.plan_fused(
                    f"{prefix}self_attn.qkv_proj.", f"{name}self_attn.qkv_proj", heads, kv_heads))
            if layer.mlp is not None:
                plan[f"{prefix}mlp.gate_up_proj.weight"] = _gate_up(layer.mlp.gate_up_proj, f"{name}mlp.gate_up_proj")
        return plan


def _gate_up(proj: ColumnParallelLinear, name: str) -> WeightSource:
    """This rank's rows of the gate half, then of the up half, of one [2 * inner, hidden] tensor."""
    inner, tp = proj.local_sizes[0], proj.tp
    a, b, full = tp.rank * inner, (tp.rank + 1) * inner, inner * tp.size
    return WeightSource([rows(f"{name}.weight", a, b), rows(f"{name}.weight", full + a, full + b)])
