"""Gemma 3 (text) and Gemma 2: one pipeline stage's share of the model.

What sets them apart from Llama: embeddings scaled by sqrt(hidden) (rounded to the model's
dtype), RMSNorms that scale by (1 + w) in float32, four norms per layer (the post-norms
normalise each sublayer's output before the residual add), a GeGLU MLP (tanh GELU), the
attention scale query_pre_attn_scalar ** -0.5, local (sliding-window) and global layers
interleaved by `layer_types`, and optionally soft-capped logits. Gemma 3 adds per-head q/k
norms and a rotary per layer type (the local layers' own base, the global layers' scaling);
Gemma 2 caps the attention logits.

Stages exchange the residual stream alone: with the post-norms inside each sublayer there is
no norm to fuse the residual add into. A layer split across stages keeps post_attention_layernorm
with its attention half, so the stream crossing the boundary is the layer's mid-point residual.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asyncpp.core.config import ModelShape
from asyncpp.core.microbatch import IntermediateTensors
from asyncpp.core.stages import StageSpec
from asyncpp.model.attention import KVCache, PagedAttention, layer_caches
from asyncpp.model.attention_metadata import AttentionMetadata
from asyncpp.model.embedding import ParallelLMHead, VocabParallelEmbedding
from asyncpp.model.layers import ACTIVATIONS, fused_norm
from asyncpp.model.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from asyncpp.model.llama import LlamaAttention, LlamaForCausalLM
from asyncpp.model.loader import WeightPlan, whole
from asyncpp.model.parallel import HeadSplit, TPGroup
from asyncpp.model.rotary import STATIC_ROPE_TYPES, RopeAt, RotaryEmbedding, rope_parameters
from asyncpp.model.sliding_window import layer_windows


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + w), in float32, rounded back to x's dtype (transformers' Gemma)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_norm(x, None, self.weight):
            return torch.ops.asyncpp.rms_norm(x, None, self.weight, self.eps, 1.0, False)[0]
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float() + 1.0, self.eps).to(x.dtype)


def _activation(cfg: Any):
    return ACTIVATIONS[getattr(cfg, "hidden_activation", None) or cfg.hidden_act]


def _rope_types(cfg: Any) -> list[str | None]:
    """Each layer's key into rope_parameters: its layer type (Gemma 3), or None (one rotary)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    return [t if t in params else None for t in cfg.layer_types]


class GemmaAttention(nn.Module):
    def __init__(self, cfg: Any, shape: ModelShape, tp: TPGroup, window: int | None):
        super().__init__()
        self.head_dim = shape.head_dim
        self.heads = HeadSplit.of(shape.num_heads, shape.num_kv_heads, tp)
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(shape.hidden_size, self.head_dim, self.heads, tp, bias=bias)
        self.o_proj = RowParallelLinear(shape.num_heads * self.head_dim, shape.hidden_size, tp, bias=bias)
        qk_norm = cfg.model_type.startswith("gemma3")
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.attn = PagedAttention(self.heads.q_local, self.heads.kv_local, self.head_dim,
                                   cfg.query_pre_attn_scalar ** -0.5, window, cfg.attn_logit_softcapping)

    def forward(self, x: torch.Tensor, rope: RopeAt, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        h, kv = self.heads.q_local, self.heads.kv_local
        qkv = self.qkv_proj(x).view(x.shape[0], h + 2 * kv, self.head_dim)
        q, k, v = qkv.split([h, kv, kv], dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
            rope.apply(q)
            rope.apply(k)
        else:
            rope.apply(qkv[:, : h + kv])
        return self.o_proj(self.attn(q, k, v, cache, meta))

    plan = LlamaAttention.plan  # the same names: q/k/v/o projections, optional q/k norms, no sinks


class GemmaMLP(nn.Module):
    def __init__(self, cfg: Any, shape: ModelShape, tp: TPGroup):
        super().__init__()
        inner = shape.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(shape.hidden_size, [inner] * 2, tp)
        self.down_proj = RowParallelLinear(inner, shape.hidden_size, tp)
        self.act = _activation(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate).mul_(up))

    def plan(self, prefix: str, name: str) -> WeightPlan:
        return {**self.gate_up_proj.plan(f"{prefix}gate_up_proj.", [f"{name}gate_proj", f"{name}up_proj"]),
                **self.down_proj.plan(f"{prefix}down_proj.", f"{name}down_proj")}


_ATTENTION_NORMS = ("input_layernorm", "post_attention_layernorm")
_MLP_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


class GemmaDecoderLayer(nn.Module):
    """A decoder layer, or one half of it where a stage boundary splits it (stages.py)."""

    def __init__(self, cfg: Any, shape: ModelShape, tp: TPGroup, window: int | None,
                 parts: tuple[bool, bool] = (True, True)):
        super().__init__()
        attention, mlp = parts
        norm = lambda: GemmaRMSNorm(shape.hidden_size, cfg.rms_norm_eps)  # noqa: E731
        self.input_layernorm = norm() if attention else None
        self.self_attn = GemmaAttention(cfg, shape, tp, window) if attention else None
        self.post_attention_layernorm = norm() if attention else None
        self.pre_feedforward_layernorm = norm() if mlp else None
        self.mlp = GemmaMLP(cfg, shape, tp) if mlp else None
        self.post_feedforward_layernorm = norm() if mlp else None

    def forward(self, x: torch.Tensor, rope: RopeAt, cache: KVCache | None, meta: AttentionMetadata) -> torch.Tensor:
        if self.self_attn is not None:
            assert cache is not None
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, cache, meta))
        if self.mlp is not None:
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x

    def plan(self, prefix: str, name: str) -> WeightPlan:
        plan: WeightPlan = {}
        halves = ((self.self_attn, "self_attn", _ATTENTION_NORMS), (self.mlp, "mlp", _MLP_NORMS))
        for module, part, norms in halves:
            if module is not None:
                plan.update({f"{prefix}{n}.weight": whole(f"{name}{n}.weight") for n in norms})
                plan.update(module.plan(f"{prefix}{part}.", f"{name}{part}."))
        return plan


class GemmaForCausalLM(nn.Module):
    """Gemma3ForCausalLM (model_type gemma3_text) and Gemma2ForCausalLM."""
    intermediate_keys = ("hidden_states",)

    def __init__(self, cfg: Any, stage: StageSpec, tp: TPGroup, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.stage = cfg, stage
        shape = ModelShape.of(cfg)
        self.tie = bool(getattr(cfg, "tie_word_embeddings", True))
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp) if stage.is_first else None
        self.embed_scale = torch.tensor(shape.hidden_size ** 0.5).to(dtype).item()  # as transformers rounds it
        first, last = stage.layer_start, stage.layer_end
        windows = layer_windows(cfg, max_positions)[first:last]
        self.rope_types = _rope_types(cfg)[first:last]
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, shape, tp, windows[i], stage.parts(i))
                                    for i in range(stage.num_layers))
        self.rotary = nn.ModuleDict({str(t): RotaryEmbedding(cfg, shape.head_dim, max_positions, dtype, t)
                                     for t in sorted(set(self.rope_types), key=str)})
        self.norm = GemmaRMSNorm(shape.hidden_size, cfg.rms_norm_eps) if stage.is_last else None
        self.lm_head = ParallelLMHead(shape.vocab_size, shape.hidden_size, tp) if stage.is_last else None
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        if self.tie and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def check_config(cfg: Any) -> None:
        """Refuse, naming the field, what this file does not build."""
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError(f"{cfg.model_type}: use_bidirectional_attention is not supported")
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
        if act not in ACTIVATIONS:
            raise ValueError(f"{cfg.model_type}: hidden_activation {act!r} is not supported")
        for key in sorted(set(_rope_types(cfg)), key=str):
            rope = rope_parameters(cfg, key)
            field = "rope_parameters" if key is None else f"rope_parameters[{key!r}]"
            if rope["rope_type"] not in STATIC_ROPE_TYPES:
                raise ValueError(f"{cfg.model_type}: {field} rope_type {rope['rope_type']!r} is not supported "
                                 f"(supported: {', '.join(STATIC_ROPE_TYPES)})")
            if rope.get("partial_rotary_factor", 1.0) != 1.0:
                raise ValueError(f"{cfg.model_type}: {field} partial_rotary_factor is not supported")

    def forward(self, input_ids: torch.Tensor | None, intermediate: IntermediateTensors | None,
                caches: list[KVCache], meta: AttentionMetadata) -> IntermediateTensors:
        if self.embed_tokens is not None:
            hidden = self.embed_tokens(input_ids) * self.embed_scale
        else:
            hidden = intermediate["hidden_states"]
        ropes = {t: rotary.at(meta.positions) for t, rotary in self.rotary.items()}
        for layer, rope_type, cache in zip(self.layers, self.rope_types, layer_caches(self.stage, caches)):
            hidden = layer(hidden, ropes[str(rope_type)], cache, meta)
        return {"hidden_states": hidden}

    def compute_logits(self, states: IntermediateTensors, rows: torch.Tensor | None) -> torch.Tensor:
        hidden = states["hidden_states"]
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        logits = self.lm_head(self.norm(hidden))
        if self.final_softcap is not None:
            logits = logits.div_(self.final_softcap).tanh_().mul_(self.final_softcap)
        return logits

    # The same tensor names as Llama's: model.embed_tokens, model.layers.N., model.norm, lm_head.
    weight_plan = LlamaForCausalLM.weight_plan
