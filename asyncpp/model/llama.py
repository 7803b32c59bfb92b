"""Llama family (Llama, Mistral, Qwen2 and their sliding windows; Qwen3, Phi-3, the MoE models,
DeepSeek and gpt-oss build on it): one pipeline stage's share of the model.

Stages exchange the un-normalised hidden states and the residual stream separately
(vLLM style): each layer's first RMSNorm adds the residual, so nothing is recomputed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from asyncpp.core.config import ModelShape
from asyncpp.core.microbatch import IntermediateTensors
from asyncpp.core.stages import StageSpec
from asyncpp.model.attention import KVCache, PagedAttention, layer_caches
from asyncpp.model.attention_metadata import AttentionMetadata
from asyncpp.model.embedding import ParallelLMHead, VocabParallelEmbedding
from asyncpp.model.layers import RMSNorm, silu_and_mul
from asyncpp.model.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from asyncpp.model.loader import Checkpoint, WeightPlan, WeightSource, rows, whole
from asyncpp.model.parallel import HeadSplit, TPGroup
from asyncpp.model.rotary import RopeAt, RotaryEmbedding
from asyncpp.model.sliding_window import layer_windows


class LlamaAttention(nn.Module):
    """`window`: a sliding window (None: full attention); `sinks`: gpt-oss's per-head attention
    sinks (this rank's heads)."""

    def __init__(self, shape: ModelShape, tp: TPGroup, qkv_bias: bool, o_bias: bool,
                 qk_norm_eps: float | None = None, window: int | None = None, sinks: bool = False):
        super().__init__()
        self.head_dim = shape.head_dim
        self.heads = HeadSplit.of(shape.num_heads, shape.num_kv_heads, tp)
        self.qkv_proj = QKVParallelLinear(shape.hidden_size, self.head_dim, self.heads, tp, bias=qkv_bias)
        self.o_proj = RowParallelLinear(shape.num_heads * self.head_dim, shape.hidden_size, tp, bias=o_bias)
        self.attn = PagedAttention(self.heads.q_local, self.heads.kv_local, self.head_dim, self.head_dim ** -0.5,
                                   window, sinks=sinks)
        # Qwen3: an RMSNorm over each query and key head, before rotary
        with_norm = qk_norm_eps is not None
        self.q_norm = RMSNorm(self.head_dim, qk_norm_eps) if with_norm else None
        self.k_norm = RMSNorm(self.head_dim, qk_norm_eps) if with_norm else None

    def forward(self, x: torch.Tensor, rope: RopeAt, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        h, kv = self.heads.q_local, self.heads.kv_local
        qkv = self.qkv_proj(x).view(x.shape[0], h + 2 * kv, self.head_dim)
        if self.q_norm is not None:
            qkv[:, :h] = self.q_norm(qkv[:, :h])[0]
            qkv[:, h:h + kv] = self.k_norm(qkv[:, h:h + kv])[0]
        rope.apply(qkv[:, : h + kv])
        q, k, v = qkv.split([h, kv, kv], dim=1)
        return self.o_proj(self.attn(q, k, v, cache, meta))

    def plan(self, prefix: str, name: str) -> WeightPlan:
        plan = {**self.qkv_proj.plan(f"{prefix}qkv_proj.", [f"{name}q_proj", f"{name}k_proj", f"{name}v_proj"]),
                **self.o_proj.plan(f"{prefix}o_proj.", f"{name}o_proj")}
        if self.q_norm is not None:
            plan[f"{prefix}q_norm.weight"] = whole(f"{name}q_norm.weight")
            plan[f"{prefix}k_norm.weight"] = whole(f"{name}k_norm.weight")
        if self.attn.sinks is not None:
            h = self.heads
            plan[f"{prefix}attn.sinks"] = WeightSource([rows(f"{name}sinks", h.q_start, h.q_start + h.q_local)])
        return plan


class LlamaMLP(nn.Module):
    def __init__(self, shape: ModelShape, tp: TPGroup, bias: bool):
        super().__init__()
        inner = shape.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(shape.hidden_size, [inner] * 2, tp, bias=bias)
        self.down_proj = RowParallelLinear(inner, shape.hidden_size, tp, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))

    def plan(self, prefix: str, name: str) -> WeightPlan:
        return {**self.gate_up_proj.plan(f"{prefix}gate_up_proj.", [f"{name}gate_proj", f"{name}up_proj"]),
                **self.down_proj.plan(f"{prefix}down_proj.", f"{name}down_proj")}


class LlamaDecoderLayer(nn.Module):
    """A decoder layer, or one half of it where a stage boundary splits it (stages.py).
    `block`: the MLP half when it is not the dense Llama MLP (a sparse MoE block); `attn`: the
    attention half when it is not Llama's (DeepSeek's latent attention)."""

    def __init__(self, cfg: Any, shape: ModelShape, tp: TPGroup, qkv_bias: bool, o_bias: bool,
                 parts: tuple[bool, bool] = (True, True), qk_norm: bool = False, block: nn.Module | None = None,
                 attn: nn.Module | None = None, window: int | None = None, round_normalized: bool = True):
        """`round_normalized`: how the layer's RMSNorms round (layers.RMSNorm)."""
        super().__init__()
        attention, mlp = parts
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(shape.hidden_size, eps, round_normalized) if attention else None
        self.self_attn = (attn or LlamaAttention(shape, tp, qkv_bias, o_bias, eps if qk_norm else None, window)
                          if attention else None)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, eps, round_normalized) if mlp else None
        self.mlp = (block or LlamaMLP(shape, tp, bool(getattr(cfg, "mlp_bias", False)))) if mlp else None

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RopeAt,
                cache: KVCache | None, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.self_attn is not None:
            assert cache is not None
            hidden, residual = self.input_layernorm(hidden, residual)
            hidden = self.self_attn(hidden, rope, cache, meta)
        if self.mlp is not None:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            hidden = self.mlp(hidden)
        return hidden, residual

    def plan(self, prefix: str, name: str) -> WeightPlan:
        plan: WeightPlan = {}
        if self.self_attn is not None:
            plan[f"{prefix}input_layernorm.weight"] = whole(f"{name}input_layernorm.weight")
            plan.update(self.self_attn.plan(f"{prefix}self_attn.", f"{name}self_attn."))
        if self.mlp is not None:
            plan[f"{prefix}post_attention_layernorm.weight"] = whole(f"{name}post_attention_layernorm.weight")
            plan.update(self.mlp.plan(f"{prefix}mlp.", f"{name}mlp."))
        return plan


class LlamaForCausalLM(nn.Module):
    intermediate_keys = ("hidden_states", "residual")
    qk_norm = False  # Qwen3: RMSNorm over each query and key head
    round_normalized = True  # the layer and final norms round the normalized row before the weight (RMSNorm)
    checkpoint_quantizations: tuple[str, ...] = ()  # quant_method values whose checkpoints load (gpt-oss: mxfp4)

    def __init__(self, cfg: Any, stage: StageSpec, tp: TPGroup, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.stage = cfg, stage
        qkv_bias, o_bias = self._biases(cfg)
        shape = ModelShape.of(cfg)
        self.tie = bool(getattr(cfg, "tie_word_embeddings", False))
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp) if stage.is_first else None
        self.windows = layer_windows(cfg, max_positions)[stage.layer_start:stage.layer_end]
        self.layers = nn.ModuleList(self._layer(cfg, shape, tp, qkv_bias, o_bias, i) for i in range(stage.num_layers))
        self.rotary = RotaryEmbedding(cfg, shape.head_dim, max_positions, dtype)
        self.norm = RMSNorm(shape.hidden_size, cfg.rms_norm_eps, self.round_normalized) if stage.is_last else None
        self.lm_head = ParallelLMHead(shape.vocab_size, shape.hidden_size, tp) if stage.is_last else None
        if self.tie and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def _layer(self, cfg: Any, shape: ModelShape, tp: TPGroup, qkv_bias: bool, o_bias: bool, i: int
               ) -> LlamaDecoderLayer:
        """Local layer i, with the halves of it this stage runs."""
        attention, mlp = self.stage.parts(i)
        layer, window = self.stage.layer_start + i, self.windows[i]
        return LlamaDecoderLayer(cfg, shape, tp, qkv_bias, o_bias, (attention, mlp), self.qk_norm,
                                 self.mlp_block(cfg, shape, tp, layer) if mlp else None,
                                 self.attention_block(cfg, shape, tp, layer, window) if attention else None, window,
                                 self.round_normalized)

    def mlp_block(self, cfg: Any, shape: ModelShape, tp: TPGroup, layer: int) -> nn.Module | None:
        """Global layer `layer`'s MLP half when it is not the dense one (MoE models override)."""
        return None

    def attention_block(self, cfg: Any, shape: ModelShape, tp: TPGroup, layer: int, window: int | None
                        ) -> nn.Module | None:
        """Global layer `layer`'s attention half (`window`: its sliding window) when it is not
        Llama's (DeepSeek, gpt-oss override)."""
        return None

    @staticmethod
    def _biases(cfg: Any) -> tuple[bool, bool]:
        if getattr(cfg, "model_type", "") == "qwen2":
            return True, False
        bias = bool(getattr(cfg, "attention_bias", False))
        return bias, bias

    def forward(self, input_ids: torch.Tensor | None, intermediate: IntermediateTensors | None,
                caches: list[KVCache], meta: AttentionMetadata) -> IntermediateTensors:
        if self.embed_tokens is not None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate["hidden_states"], intermediate["residual"]
        rope = self.rotary.at(meta.positions)
        for layer, cache in zip(self.layers, layer_caches(self.stage, caches)):
            hidden, residual = layer(hidden, residual, rope, cache, meta)
        return {"hidden_states": hidden, "residual": residual}

    def compute_logits(self, states: IntermediateTensors, rows: torch.Tensor | None) -> torch.Tensor:
        hidden, residual = states["hidden_states"], states["residual"]
        if rows is not None:
            hidden, residual = hidden.index_select(0, rows), residual.index_select(0, rows)
        hidden, _ = self.norm(hidden, residual)
        return self.lm_head(hidden)

    def weight_plan(self, ckpt: Checkpoint) -> WeightPlan:
        embed = "model.embed_tokens.weight"
        plan: WeightPlan = {}
        if self.embed_tokens is not None:
            plan.update(self.embed_tokens.plan("embed_tokens.", embed))
        for i, layer in enumerate(self.layers):
            plan.update(layer.plan(f"layers.{i}.", f"model.layers.{self.stage.layer_start + i}."))
        if self.norm is not None:
            plan["norm.weight"] = whole("model.norm.weight")
            head = embed if self.tie or not ckpt.has("lm_head.weight") else "lm_head.weight"
            if not (self.tie and self.embed_tokens is not None):
                plan.update(self.lm_head.plan("lm_head.", head))
        return plan
