"""Attention as explicit matmuls, for what SDPA cannot express: soft-capped logits (Gemma 2)
and attention sinks (gpt-oss: a learned logit per head that takes softmax mass and adds no
value), as transformers' eager path computes them. Queries go a chunk at a time, so the
scores never exceed [heads, QUERY_CHUNK, keys] however long the prompt."""
from __future__ import annotations

import torch

QUERY_CHUNK = 256


def eager_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                    scale: float, softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """query [heads, n, d]; keys, values [kv_heads, m, d]; mask [n, m] bool, True = attend
    (None: causal, n == m); sinks [heads] -> [heads, n, d]."""
    group = query.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    n, m = query.shape[1], keys.shape[1]
    out = query.new_empty(query.shape[0], n, values.shape[-1])
    for a in range(0, n, QUERY_CHUNK):
        b = min(n, a + QUERY_CHUNK)
        scores = torch.matmul(query[:, a:b], keys.transpose(1, 2)).float().mul_(scale)
        if softcap is not None:
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        attend = mask[a:b] if mask is not None else (
            torch.arange(m, device=query.device)[None, :] <= torch.arange(a, b, device=query.device)[:, None])
        scores.masked_fill_(~attend, float("-inf"))
        sink = None if sinks is None else sinks[:, None, None].expand(-1, b - a, 1)
        out[:, a:b] = torch.matmul(sink_softmax(scores, sink).to(values.dtype), values)
    return out


def sink_softmax(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dimension, in float32; `sinks` (shaped as scores[..., :1]) join the
    normalisation as one more logit each, then are dropped."""
    if sinks is None:
        return scores.float().softmax(dim=-1)
    combined = torch.cat([scores.float(), sinks.float()], dim=-1)
    return combined.softmax(dim=-1)[..., :-1]
