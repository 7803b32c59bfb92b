"""Paged attention: torch ops, and the compiled decode kernel on CPU.

Cache layout per layer (one pair per virtual engine region):
  K: [num_blocks, kv_heads, head_dim, block_size]   (transposed inside a block)
  V: [num_blocks, block_size, kv_heads, head_dim]
Both hold the same bytes as the textbook [num_blocks, block_size, kv_heads, head_dim].

Decode (one new token per sequence) is memory bound: gathering K/V into a padded batch and
then running SDPA reads the context three times. On CPU the compiled kernel (kernels.py) reads
each KV head's blocks once for all the query heads that share it. Without it, two
`embedding_bag` calls read the cache in place: scores = sum_d q[d] * K[block, head, d, :] (a
weighted sum of block_size-long rows, hence the transposed K), and out = sum_l p[l] *
V[slot_l, head, :]. Prefill is compute bound and uses scaled_dot_product_attention per sequence.

A sliding-window layer (`window`) reads the metadata's view for its window (attention_metadata.py).
Gemma 2's soft-capping of the attention logits (`softcap`: cap * tanh(scores / cap), before
the mask) and gpt-oss's attention sinks (`sinks`: a logit per head in each softmax) run the
prefill as explicit matmuls (eager_attention.py: SDPA can do neither) and cost one tanh, or
one more softmax column, in decode.

An 8-bit cache (kv_quant.py) holds uint8 bytes: new K/V are quantized as they are written;
the compiled kernel widens each element as it reads it; the torch path widens the blocks a
step reads into a dense copy (decode: every block of the step, in table order). The scales
fold into the query and the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncpp.core.stages import StageSpec
from asyncpp.model import kernels
from asyncpp.model.attention_metadata import AttentionMetadata, DecodeBatch, KernelDecode, PrefillSeq
from asyncpp.model.eager_attention import eager_attention, sink_softmax
from asyncpp.model.host_memory import resident_zeros
from asyncpp.model.kv_quant import Fp8Format, storage_dtype

# One layer's cache: (K, V), or (latent,) for multi-head latent attention (mla.py).
KVCache = tuple[torch.Tensor, ...]


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device | str) -> list[KVCache]:
    keys = _cache_tensor((num_layers, num_blocks, kv_heads, head_dim, block_size), dtype, device)
    values = _cache_tensor((num_layers, num_blocks, block_size, kv_heads, head_dim), dtype, device)
    return [(keys[i], values[i]) for i in range(num_layers)]


def allocate_latent_cache(num_layers: int, num_blocks: int, block_size: int, dim: int, dtype: torch.dtype,
                          device: torch.device | str) -> list[KVCache]:
    """Multi-head latent attention: one [num_blocks, block_size, dim] tensor per layer."""
    latent = _cache_tensor((num_layers, num_blocks, block_size, dim), dtype, device)
    return [(latent[i],) for i in range(num_layers)]


def _cache_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    # Every read is of a written slot or masked out, so the contents do not matter: on a GPU
    # the memory is uninitialised; on a CPU it is made resident now (host_memory.py).
    if torch.device(device).type == "cpu":
        return resident_zeros(shape, storage_dtype(dtype))
    return torch.empty(shape, dtype=storage_dtype(dtype), device=device)


def layer_caches(stage: StageSpec, caches: list[KVCache]) -> list[KVCache | None]:
    """One entry per local layer: None for a split layer whose attention ran on the stage before."""
    return [None, *caches] if stage.mlp_only_first else list(caches)


class PagedAttention(nn.Module):
    """`sinks`: gpt-oss's learned logit per (local) head, joining each softmax without a value."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 window: int | None = None, softcap: float | None = None, sinks: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.window, self.softcap = scale, window, softcap
        self.sinks = nn.Parameter(torch.empty(num_heads), requires_grad=False) if sinks else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [tokens, heads, head_dim]; k, v [tokens, kv_heads, head_dim] -> [tokens, heads*head_dim]."""
        write_kv(cache, k, v, meta)
        prefills, d = meta.view(self.window)
        if d is not None and d.token_index is None:  # decodes only
            return self._decode(q, cache, d, meta.kv_format)
        out = q.new_empty(meta.num_tokens, self.num_heads * self.head_dim)
        for p in prefills:
            out[p.token_start:p.token_end] = self._prefill(q, k, v, cache, p, meta.kv_format)
        if d is not None:
            out.index_copy_(0, d.token_index, self._decode(q.index_select(0, d.token_index), cache, d,
                                                            meta.kv_format))
        return out

    def _prefill(self, q, k, v, cache: KVCache, p: PrefillSeq, fmt: Fp8Format | None) -> torch.Tensor:
        a, b = p.token_start, p.token_end
        query = q[a:b].transpose(0, 1)
        if p.context_blocks is None:
            keys, values = k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
        else:
            keys, values = gather_context(cache, p.context_blocks, p.context_len - p.kv_start, q.dtype, fmt)
        mask = p.mask
        if self.softcap is not None or self.sinks is not None:
            out = eager_attention(query, keys, values, mask, self.scale, self.softcap, self.sinks)
            return out.transpose(0, 1).reshape(b - a, -1)
        # 4-D inputs: with 3-D ones the CPU backend falls back to the slow math kernel.
        out = F.scaled_dot_product_attention(
            query[None], keys[None], values[None], attn_mask=mask, is_causal=mask is None, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        return out[0].transpose(0, 1).reshape(b - a, -1)

    def _decode(self, q: torch.Tensor, cache: KVCache, d: KernelDecode | DecodeBatch,
                fmt: Fp8Format | None) -> torch.Tensor:
        if isinstance(d, KernelDecode):
            return self._decode_kernel(q, cache, d, fmt)
        key_cache, value_cache = cache
        scale = self.scale
        if fmt is not None:
            assert d.blocks is not None
            key_cache = fmt.widen(key_cache.index_select(0, d.blocks), q.dtype)
            value_cache = fmt.widen(value_cache.index_select(0, d.blocks), q.dtype)
            scale *= fmt.k_unit
        weights = (q * scale).view(-1, self.head_dim).index_select(0, d.query_rows)
        scores = F.embedding_bag(d.score_index, key_cache.view(-1, key_cache.shape[-1]), d.score_offsets,
                                 mode="sum", per_sample_weights=weights.view(-1))
        scores = scores.view(d.num_seqs, self.num_heads, d.padded_len)
        if self.softcap is not None:
            scores = scores.div_(self.softcap).tanh_().mul_(self.softcap)
        scores = scores.masked_fill_(d.pad_mask, float("-inf"))
        if self.sinks is None:
            probs = scores.softmax(dim=-1)
        else:
            probs = sink_softmax(scores, self.sinks[None, :, None].expand(d.num_seqs, -1, 1)).to(q.dtype).contiguous()
        out = F.embedding_bag(d.value_index, value_cache.view(-1, self.head_dim), d.value_offsets,
                              mode="sum", per_sample_weights=probs.view(-1).index_select(0, d.prob_index))
        if fmt is not None:
            out.mul_(fmt.v_unit)
        return out.view(d.num_seqs, self.num_heads * self.head_dim)

    def _decode_kernel(self, q: torch.Tensor, cache: KVCache, d: KernelDecode, fmt: Fp8Format | None
                       ) -> torch.Tensor:
        q = q.view(d.num_seqs, self.num_heads, self.head_dim)
        window = dict(first_pos=d.first_pos, softcap=self.softcap or 0.0, sinks=self.sinks)
        if fmt is None:
            return kernels.paged_decode_attention(q, *cache, d.block_tables, d.context_lens, self.scale, **window)
        return kernels.paged_decode_attention(q, *cache, d.block_tables, d.context_lens, self.scale * fmt.k_unit,
                                              fp8_table=fmt.table(), fp8_kind=fmt.kernel_kind, v_unit=fmt.v_unit,
                                              **window)


def write_kv(cache: KVCache, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    key_cache, value_cache = cache
    fmt = meta.kv_format
    if fmt is not None:
        k, v = fmt.quantize(k, fmt.k_scale), fmt.quantize(v, fmt.v_scale)
    key_cache[meta.slot_blocks, :, :, meta.slot_offsets] = k
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v)


def gather_context(cache: KVCache, blocks: torch.Tensor, length: int, dtype: torch.dtype,
                   fmt: Fp8Format | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a sequence's first `length` positions, each [kv_heads, length, head_dim]."""
    key_cache, value_cache = cache
    keys, values = key_cache.index_select(0, blocks), value_cache.index_select(0, blocks)
    if fmt is not None:
        keys = fmt.widen(keys, dtype).mul_(fmt.k_unit)
        values = fmt.widen(values, dtype).mul_(fmt.v_unit)
    keys = keys.permute(1, 0, 3, 2).flatten(1, 2)[:, :length]
    values = values.flatten(0, 1)[:length].transpose(0, 1)
    return keys, values
