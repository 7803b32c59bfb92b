"""Multi-head latent attention (DeepSeek-V2/V3; transformers' DeepseekV3Attention).

Per token and layer the cache holds one entry of kv_lora_rank + qk_rope_head_dim elements,
shared by every head: the normalised latent c_kv and the rotated key part k_pe (one
[blocks, block_size, entry] tensor per layer) instead of per-head K and V. Each head's key
and value are up-projections of the latent (kv_b_proj): k_nope = W_UK c_kv, v = W_UV c_kv.

Prefill (compute bound) expands the context's latents into per-head keys and values and runs
SDPA, as transformers does. Decode (memory bound) runs in the absorbed form: W_UK folds into
the query (q_nope W_UK: one kv_lora_rank vector per head), the scores and the softmax mix
read only the cached entries (every head the same ones), and W_UV turns each head's mixed
latent into its value afterwards.

Under TP the heads split (q_b_proj or q_proj and kv_b_proj by rows, o_proj by columns); the
latent projections (q_a_proj, kv_a_proj_with_mqa) and their norms are small and replicated,
so every rank computes and caches the whole latent of its layers (as vLLM does).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asyncpp.core.config import LatentShape, ModelShape
from asyncpp.model.attention import KVCache
from asyncpp.model.attention_metadata import AttentionMetadata, LatentDecode, PrefillSeq
from asyncpp.model.kv_quant import Fp8Format
from asyncpp.model.layers import RMSNorm
from asyncpp.model.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from asyncpp.model.loader import WeightPlan, whole
from asyncpp.model.parallel import TPGroup, divide
from asyncpp.model.rotary import RopeAt, rope_parameters

LATENT_NORM_EPS = 1e-6  # q_a_layernorm, kv_a_layernorm: transformers builds them with the default eps


class LatentUpProjection(ColumnParallelLinear):
    """kv_b_proj, this rank's heads: [heads * (qk_nope + v), kv_lora_rank]. Kept dense (never
    prepacked or quantized): its per-head slices are the absorbed decode's batched operands."""

    def prepare(self, quantization: str | None, shared: bool) -> None:
        return None

    def per_head(self, heads: int) -> torch.Tensor:
        return self.weight.view(heads, -1, self.weight.shape[1])


class LatentAttention(nn.Module):
    def __init__(self, cfg: Any, shape: ModelShape, tp: TPGroup):
        super().__init__()
        assert shape.latent is not None
        m: LatentShape = shape.latent
        self.m, self.heads = m, divide(shape.num_heads, tp.size, "num_attention_heads")
        bias = bool(getattr(cfg, "attention_bias", False))
        hidden, q_out = shape.hidden_size, shape.num_heads * m.qk_head_dim
        lora = m.q_lora_rank
        self.q_proj = None if lora else ColumnParallelLinear(hidden, [q_out], tp)
        self.q_a_proj = ReplicatedLinear(hidden, lora, bias) if lora else None
        self.q_a_layernorm = RMSNorm(lora, LATENT_NORM_EPS) if lora else None
        self.q_b_proj = ColumnParallelLinear(lora, [q_out], tp) if lora else None
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, m.cache_dim, bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = LatentUpProjection(m.kv_lora_rank, [shape.num_heads * (m.qk_nope_head_dim + m.v_head_dim)],
                                            tp)
        self.o_proj = RowParallelLinear(shape.num_heads * m.v_head_dim, hidden, tp, bias=bias)
        self.scale = softmax_scale(cfg, m.qk_head_dim)
        # DeepSeek's rotary pairs are interleaved (x0, x1), (x2, x3)...; V2 has no field and always is
        self.interleaved = bool(getattr(cfg, "rope_interleave", True))

    def forward(self, x: torch.Tensor, rope: RopeAt, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        m, n = self.m, x.shape[0]
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))[0])
        q = q.view(n, self.heads, m.qk_head_dim)
        entry = self.kv_a_proj_with_mqa(x)  # [tokens, kv_lora_rank + qk_rope_head_dim]
        entry[:, : m.kv_lora_rank] = self.kv_a_layernorm(entry[:, : m.kv_lora_rank])[0]
        self._rotate(q[..., m.qk_nope_head_dim:], rope)
        self._rotate(entry[:, None, m.kv_lora_rank:], rope)
        write_latent(cache, entry, meta)
        return self.o_proj(self._attend(q, entry, cache, meta))

    def _rotate(self, x: torch.Tensor, rope: RopeAt) -> None:
        """In place. Interleaved pairs are first laid out as halves (evens, then odds), as
        transformers' apply_rotary_pos_emb_interleave returns them; q and k alike, so their
        dot products are the same."""
        if self.interleaved:
            x.copy_(torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1))
        rope.apply(x)

    def _attend(self, q: torch.Tensor, entry: torch.Tensor, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        d, fmt = meta.decode, meta.kv_format
        assert d is None or isinstance(d, LatentDecode)
        if d is not None and d.token_index is None:  # decodes only
            return self._decode(q, cache, d, fmt)
        out = q.new_empty(meta.num_tokens, self.heads * self.m.v_head_dim)
        for p in meta.prefills:
            out[p.token_start:p.token_end] = self._prefill(q, entry, cache, p, fmt)
        if d is not None:
            out.index_copy_(0, d.token_index, self._decode(q.index_select(0, d.token_index), cache, d, fmt))
        return out

    def _prefill(self, q: torch.Tensor, entry: torch.Tensor, cache: KVCache, p: PrefillSeq,
                 fmt: Fp8Format | None) -> torch.Tensor:
        """Expanded: per-head keys and values of the whole context, then SDPA."""
        m, h, a, b = self.m, self.heads, p.token_start, p.token_end
        if p.context_blocks is None:
            context, mask = entry[a:b], None
        else:
            (latent,) = cache
            stored = latent.index_select(0, p.context_blocks).flatten(0, 1)[: p.context_len]
            context, mask = widen(stored, q.dtype, fmt), p.mask
        n, nope, lora = context.shape[0], m.qk_nope_head_dim, m.kv_lora_rank
        kv = self.kv_b_proj(context[:, :lora]).view(n, h, nope + m.v_head_dim)
        keys = torch.cat([kv[..., :nope], context[:, None, lora:].expand(n, h, m.qk_rope_head_dim)], dim=-1)
        out = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1)[None], keys.transpose(0, 1)[None], kv[..., nope:].transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return out[0].transpose(0, 1).reshape(b - a, h * m.v_head_dim)

    def _decode(self, q: torch.Tensor, cache: KVCache, d: LatentDecode, fmt: Fp8Format | None) -> torch.Tensor:
        """Absorbed: attention over the cached entries themselves."""
        m, h, nope, lora = self.m, self.heads, self.m.qk_nope_head_dim, self.m.kv_lora_rank
        w = self.kv_b_proj.per_head(h)  # [heads, qk_nope + v, kv_lora_rank]
        q_latent = torch.bmm(q[..., :nope].transpose(0, 1), w[:, :nope])  # [heads, seqs, kv_lora_rank]
        query = torch.cat([q_latent, q[..., nope:].transpose(0, 1)], dim=-1).transpose(0, 1).mul_(self.scale)
        (latent,) = cache
        context = widen(latent[d.block_tables].flatten(1, 2), q.dtype, fmt)  # [seqs, positions, entry]
        # Slots past a context may never have been written (the cache is not zeroed): 0 * nan would leak
        context.view(-1, context.shape[-1]).index_fill_(0, d.pad_rows, 0.0)
        scores = torch.bmm(query, context.transpose(1, 2)).float()  # [seqs, heads, positions]
        probs = scores.masked_fill_(d.pad_mask, float("-inf")).softmax(dim=-1).to(q.dtype)
        mixed = torch.bmm(probs, context[..., :lora])  # [seqs, heads, kv_lora_rank]
        out = torch.bmm(mixed.transpose(0, 1), w[:, nope:].transpose(1, 2))  # [heads, seqs, v]
        return out.transpose(0, 1).reshape(d.num_seqs, h * m.v_head_dim)

    def plan(self, prefix: str, name: str) -> WeightPlan:
        plan: WeightPlan = {}
        if self.q_proj is not None:
            plan.update(self.q_proj.plan(f"{prefix}q_proj.", [f"{name}q_proj"]))
        else:
            plan.update(self.q_a_proj.plan(f"{prefix}q_a_proj.", f"{name}q_a_proj"))
            plan[f"{prefix}q_a_layernorm.weight"] = whole(f"{name}q_a_layernorm.weight")
            plan.update(self.q_b_proj.plan(f"{prefix}q_b_proj.", [f"{name}q_b_proj"]))
        plan.update(self.kv_a_proj_with_mqa.plan(f"{prefix}kv_a_proj_with_mqa.", f"{name}kv_a_proj_with_mqa"))
        plan[f"{prefix}kv_a_layernorm.weight"] = whole(f"{name}kv_a_layernorm.weight")
        plan.update(self.kv_b_proj.plan(f"{prefix}kv_b_proj.", [f"{name}kv_b_proj"]))
        plan.update(self.o_proj.plan(f"{prefix}o_proj.", f"{name}o_proj"))
        return plan


def softmax_scale(cfg: Any, qk_head_dim: int) -> float:
    """1 / sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim) squared where set."""
    from transformers.modeling_rope_utils import yarn_apply_mscale

    return float(yarn_apply_mscale(rope_parameters(cfg), qk_head_dim ** -0.5))


def write_latent(cache: KVCache, entry: torch.Tensor, meta: AttentionMetadata) -> None:
    (latent,) = cache
    fmt = meta.kv_format
    if fmt is not None:
        entry = fmt.quantize(entry, fmt.k_scale)
    latent.view(-1, latent.shape[-1]).index_copy_(0, meta.slot_mapping, entry)


def widen(stored: torch.Tensor, dtype: torch.dtype, fmt: Fp8Format | None) -> torch.Tensor:
    return stored if fmt is None else fmt.widen(stored, dtype).mul_(fmt.k_unit)
