"""Prompt chunks of equal cost while nothing decodes at P > 1.

A chunk's time on a stage grows with its position in the prompt: its linear layers cost the
same per token anywhere, its attention reads every earlier position. Across P stages the
pipeline finishes a prompt one chunk-time after its slowest stage (the last chunk drains
through the later stages; with balanced stages the costliest chunk sets that tail), so equal
budget-long chunks end on their dearest. Sizing each chunk to cost what a budget-long chunk
costs at the prompt's start keeps every chunk's time equal and the tail short (SGLang sizes
pipelined chunks from a fitted curve in the same spirit).
"""
from __future__ import annotations

import math

from asyncpp.core.config import ModelShape


def attention_share(shape: ModelShape) -> float:
    """One earlier position's attention work for one token, relative to the token's own
    linear work in the layer (projections and MLP, the active experts for MoE), counted in
    multiply-adds; the LM head runs on sampled rows only and is left out."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    inner = shape.intermediate_size
    if shape.num_experts:
        inner = shape.experts_per_token * shape.expert_intermediate_size + shape.shared_expert_intermediate_size
    linear = h * (2 * q + 2 * kv) + (3 if shape.gated_mlp else 2) * h * inner
    return 2 * q / linear  # scores and the weighted sum: two multiply-adds per head dimension


def equal_cost_chunk(start: int, budget: int, share: float) -> int:
    """Tokens of a chunk from position `start` that cost what `budget` tokens cost from 0, the
    cost of n tokens after p being n * (1 + share * (p + n / 2))."""
    if share <= 0 or start <= 0:
        return budget
    target = budget * (1 + share * budget / 2)
    b = 1 + share * start
    return max(1, min(budget, int((-b + math.sqrt(b * b + 2 * share * target)) / share)))
