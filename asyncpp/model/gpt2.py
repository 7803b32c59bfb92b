"""GPT-2: learned positions, LayerNorm, gelu_new, Conv1D checkpoints ([in, out]), tied head."""
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
from asyncpp.model.layers import ACTIVATIONS
from asyncpp.model.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from asyncpp.model.loader import Checkpoint, WeightPlan, whole
from asyncpp.model.parallel import HeadSplit, TPGroup


def _layer_norm(cfg: Any) -> nn.LayerNorm:
    norm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
    norm.requires_grad_(False)
    return norm


def _norm_plan(prefix: str, name: str) -> WeightPlan:
    return {f"{prefix}weight": whole(f"{name}weight"), f"{prefix}bias": whole(f"{name}bias")}


class GPT2Attention(nn.Module):
    def __init__(self, cfg: Any, tp: TPGroup, layer_idx: int):
        super().__init__()
        shape = ModelShape.of(cfg)
        self.num_heads, self.head_dim = shape.num_heads, shape.head_dim
        self.heads = HeadSplit.of(cfg.n_head, cfg.n_head, tp)
        self.c_attn = QKVParallelLinear(cfg.n_embd, self.head_dim, self.heads, tp, bias=True)
        self.c_proj = RowParallelLinear(cfg.n_embd, cfg.n_embd, tp, bias=True)
        scale = self.head_dim ** -0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = PagedAttention(self.heads.q_local, self.heads.kv_local, self.head_dim, scale)

    def forward(self, x: torch.Tensor, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.c_attn(x).view(x.shape[0], 3 * self.heads.q_local, self.head_dim)
        q, k, v = qkv.chunk(3, dim=1)
        return self.c_proj(self.attn(q, k, v, cache, meta))

    def plan(self, prefix: str, name: str) -> WeightPlan:
        return {**self.c_attn.plan_fused(f"{prefix}c_attn.", f"{name}c_attn", self.num_heads, self.num_heads,
                                         conv1d=True),
                **self.c_proj.plan(f"{prefix}c_proj.", f"{name}c_proj", conv1d=True)}


class GPT2MLP(nn.Module):
    def __init__(self, cfg: Any, tp: TPGroup):
        super().__init__()
        inner = ModelShape.of(cfg).intermediate_size
        self.c_fc = ColumnParallelLinear(cfg.n_embd, [inner], tp, bias=True)
        self.c_proj = RowParallelLinear(inner, cfg.n_embd, tp, bias=True)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))

    def plan(self, prefix: str, name: str) -> WeightPlan:
        return {**self.c_fc.plan(f"{prefix}c_fc.", [f"{name}c_fc"], conv1d=True),
                **self.c_proj.plan(f"{prefix}c_proj.", f"{name}c_proj", conv1d=True)}


class GPT2Block(nn.Module):
    """A block, or one half of it where a stage boundary splits it (stages.py)."""

    def __init__(self, cfg: Any, tp: TPGroup, layer_idx: int, parts: tuple[bool, bool] = (True, True)):
        super().__init__()
        attention, mlp = parts
        self.ln_1 = _layer_norm(cfg) if attention else None
        self.attn = GPT2Attention(cfg, tp, layer_idx) if attention else None
        self.ln_2 = _layer_norm(cfg) if mlp else None
        self.mlp = GPT2MLP(cfg, tp) if mlp else None

    def forward(self, hidden: torch.Tensor, cache: KVCache | None, meta: AttentionMetadata) -> torch.Tensor:
        if self.attn is not None:
            assert cache is not None
            hidden = hidden + self.attn(self.ln_1(hidden), cache, meta)
        if self.mlp is not None:
            hidden = hidden + self.mlp(self.ln_2(hidden))
        return hidden

    def plan(self, prefix: str, name: str) -> WeightPlan:
        plan: WeightPlan = {}
        if self.attn is not None:
            plan.update({**_norm_plan(f"{prefix}ln_1.", f"{name}ln_1."),
                         **self.attn.plan(f"{prefix}attn.", f"{name}attn.")})
        if self.mlp is not None:
            plan.update({**_norm_plan(f"{prefix}ln_2.", f"{name}ln_2."),
                         **self.mlp.plan(f"{prefix}mlp.", f"{name}mlp.")})
        return plan


class GPT2LMHeadModel(nn.Module):
    intermediate_keys = ("hidden_states",)

    def __init__(self, cfg: Any, stage: StageSpec, tp: TPGroup, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.stage = cfg, stage
        first, last = stage.is_first, stage.is_last
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.n_embd, tp) if first else None
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd).requires_grad_(False) if first else None
        self.h = nn.ModuleList(GPT2Block(cfg, tp, stage.layer_start + i, stage.parts(i))
                               for i in range(stage.num_layers))
        self.ln_f = _layer_norm(cfg) if last else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.n_embd, tp) if last else None
        self.tie = bool(getattr(cfg, "tie_word_embeddings", True))
        if self.tie and first and last:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor | None, intermediate: IntermediateTensors | None,
                caches: list[KVCache], meta: AttentionMetadata) -> IntermediateTensors:
        if self.wte is not None:
            hidden = self.wte(input_ids) + self.wpe(meta.positions)
        else:
            hidden = intermediate["hidden_states"]
        for block, cache in zip(self.h, layer_caches(self.stage, caches)):
            hidden = block(hidden, cache, meta)
        return {"hidden_states": hidden}

    def compute_logits(self, states: IntermediateTensors, rows: torch.Tensor | None) -> torch.Tensor:
        hidden = states["hidden_states"]
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        return self.lm_head(self.ln_f(hidden))

    def weight_plan(self, ckpt: Checkpoint) -> WeightPlan:
        root = "transformer." if ckpt.has("transformer.wte.weight") or ckpt.has("transformer.h.0.ln_1.weight") else ""
        plan: WeightPlan = {}
        if self.wte is not None:
            plan.update(self.wte.plan("wte.", f"{root}wte.weight"))
            plan["wpe.weight"] = whole(f"{root}wpe.weight")
        for i, block in enumerate(self.h):
            plan.update(block.plan(f"h.{i}.", f"{root}h.{self.stage.layer_start + i}."))
        if self.ln_f is not None:
            plan.update(_norm_plan("ln_f.", f"{root}ln_f."))
            if not (self.tie and self.wte is not None):
                untied = not self.tie and ckpt.has("lm_head.weight")
                plan.update(self.lm_head.plan("lm_head.", "lm_head.weight" if untied else f"{root}wte.weight"))
        return plan
