"""The tensor-parallel group a model layer talks to, and how a dimension splits across it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TPGroup(Protocol):
    """The ranks of one pipeline stage that share its layers (Megatron-style)."""
    rank: int
    size: int

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum `t` across the group, in place."""

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's `t` along `dim`, in rank order."""


@dataclass(slots=True)
class SingleRankGroup:
    """T = 1: nothing to exchange."""
    rank: int = 0
    size: int = 1

    def all_reduce(self, t: torch.Tensor) -> None:
        return None

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({parts})")
    return total // parts


@dataclass(frozen=True, slots=True)
class HeadSplit:
    """Which attention heads one rank holds.

    Query heads always split evenly. KV heads split when the group size divides them;
    otherwise each rank keeps the one KV head its query heads use (replicated KV).
    """
    q_start: int
    q_local: int
    kv_start: int
    kv_local: int

    @classmethod
    def of(cls, num_heads: int, num_kv_heads: int, tp: TPGroup) -> "HeadSplit":
        q_local = divide(num_heads, tp.size, "num_attention_heads")
        if num_kv_heads % tp.size == 0:
            kv_local = num_kv_heads // tp.size
            return cls(tp.rank * q_local, q_local, tp.rank * kv_local, kv_local)
        if tp.size % num_kv_heads:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) and tensor_parallel_size "
                             f"({tp.size}) must divide one another")
        return cls(tp.rank * q_local, q_local, tp.rank * num_kv_heads // tp.size, 1)
