"""Vocab-parallel token embedding and LM head: each TP rank holds a contiguous vocab slice."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncpp.model.gemm import PackableLinear, linear
from asyncpp.model.loader import WeightPlan, WeightSource, rows
from asyncpp.model.parallel import TPGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.per_rank = -(-vocab_size // tp.size)  # padded so every rank holds the same rows
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        self.tp.all_reduce(out)
        return out

    def plan(self, prefix: str, name: str) -> WeightPlan:
        stop = min(self.start + self.per_rank, self.vocab_size)
        return {f"{prefix}weight": WeightSource([rows(name, self.start, stop)], pad_rows=True)}


class ParallelLMHead(VocabParallelEmbedding, PackableLinear):
    """Logits for the whole vocab, in float32 (what the sampler reads): local matmul, then
    the slices gathered across ranks."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.gemm_weight, out_dtype=torch.float32)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits, dim=-1)[:, : self.vocab_size]
        return logits
