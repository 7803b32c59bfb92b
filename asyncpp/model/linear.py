"""Megatron tensor-parallel linears: column-parallel (output split, no communication) and
row-parallel (input split, one all-reduce). Weights are [out, in] as nn.Linear; GPT-2's
Conv1D checkpoints ([in, out]) are transposed while loading."""
from __future__ import annotations

import torch
from torch import nn

from asyncpp.model.gemm import PackableLinear, linear
from asyncpp.model.loader import TensorSlice, WeightPlan, WeightSource, cols, rows
from asyncpp.model.parallel import HeadSplit, TPGroup, divide


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _out_slice(name: str, start: int, stop: int, conv1d: bool) -> TensorSlice:
    """Rows [start, stop) of the output dimension."""
    return cols(name, start, stop, transpose=True) if conv1d else rows(name, start, stop)


class ColumnParallelLinear(PackableLinear):
    """One or more projections of the same input fused into one matmul (e.g. gate and up),
    each split by rows across the TP group."""

    def __init__(self, in_features: int, output_sizes: list[int], tp: TPGroup, bias: bool = False):
        super().__init__()
        self.tp = tp
        self.local_sizes = [divide(n, tp.size, "projection size") for n in output_sizes]
        self.weight = _param(sum(self.local_sizes), in_features)
        self.bias = _param(sum(self.local_sizes)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.gemm_weight, self.bias)

    def plan(self, prefix: str, names: list[str], conv1d: bool = False) -> WeightPlan:
        """`names`: the checkpoint tensors (without .weight), one per output size."""
        ranges = [(self.tp.rank * n, (self.tp.rank + 1) * n) for n in self.local_sizes]
        plan = {f"{prefix}weight": WeightSource(
            [_out_slice(f"{name}.weight", a, b, conv1d) for name, (a, b) in zip(names, ranges)])}
        if self.bias is not None:
            plan[f"{prefix}bias"] = WeightSource(
                [rows(f"{name}.bias", a, b) for name, (a, b) in zip(names, ranges)])
        return plan


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul; this rank's heads only."""

    def __init__(self, hidden: int, head_dim: int, heads: HeadSplit, tp: TPGroup, bias: bool = False):
        nn.Module.__init__(self)
        self.tp, self.heads, self.head_dim = tp, heads, head_dim
        self.local_sizes = [heads.q_local * head_dim, heads.kv_local * head_dim, heads.kv_local * head_dim]
        self.weight = _param(sum(self.local_sizes), hidden)
        self.bias = _param(sum(self.local_sizes)) if bias else None

    def _ranges(self, q_offset: int, k_offset: int, v_offset: int) -> list[tuple[int, int]]:
        h, d = self.heads, self.head_dim
        return [(q_offset + h.q_start * d, q_offset + (h.q_start + h.q_local) * d),
                (k_offset + h.kv_start * d, k_offset + (h.kv_start + h.kv_local) * d),
                (v_offset + h.kv_start * d, v_offset + (h.kv_start + h.kv_local) * d)]

    def plan(self, prefix: str, names: list[str], conv1d: bool = False) -> WeightPlan:
        """Separate checkpoint tensors: names = [q, k, v]."""
        return self._plan(prefix, names, self._ranges(0, 0, 0), conv1d)

    def plan_fused(self, prefix: str, name: str, num_heads: int, num_kv_heads: int,
                   conv1d: bool = False) -> WeightPlan:
        """One checkpoint tensor holding [q; k; v] along the output dimension (GPT-2 c_attn)."""
        q_size, kv_size = num_heads * self.head_dim, num_kv_heads * self.head_dim
        return self._plan(prefix, [name] * 3, self._ranges(0, q_size, q_size + kv_size), conv1d)

    def _plan(self, prefix: str, names: list[str], ranges: list[tuple[int, int]], conv1d: bool) -> WeightPlan:
        plan = {f"{prefix}weight": WeightSource(
            [_out_slice(f"{n}.weight", a, b, conv1d) for n, (a, b) in zip(names, ranges)])}
        if self.bias is not None:
            plan[f"{prefix}bias"] = WeightSource([rows(f"{n}.bias", a, b) for n, (a, b) in zip(names, ranges)])
        return plan


class ReplicatedLinear(PackableLinear):
    """The whole weight on every rank of the group (a projection too small to split, or one
    whose output every rank needs whole)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = _param(out_features, in_features)
        self.bias = _param(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.gemm_weight, self.bias)

    def plan(self, prefix: str, name: str) -> WeightPlan:
        plan = {f"{prefix}weight": WeightSource([TensorSlice(f"{name}.weight")])}
        if self.bias is not None:
            plan[f"{prefix}bias"] = WeightSource([TensorSlice(f"{name}.bias")])
        return plan


class RowParallelLinear(PackableLinear):
    """Input split across the group; partial products summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = False):
        super().__init__()
        self.tp = tp
        self.in_local = divide(in_features, tp.size, "projection input size")
        self.weight = _param(out_features, self.in_local)
        self.bias = _param(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return linear(x, self.gemm_weight, self.bias)
        y = linear(x, self.gemm_weight)
        self.tp.all_reduce(y)
        return y if self.bias is None else y.add_(self.bias)

    def plan(self, prefix: str, name: str, conv1d: bool = False) -> WeightPlan:
        a, b = self.tp.rank * self.in_local, (self.tp.rank + 1) * self.in_local
        weight = rows(f"{name}.weight", a, b, transpose=True) if conv1d else cols(f"{name}.weight", a, b)
        plan = {f"{prefix}weight": WeightSource([weight])}
        if self.bias is not None:
            plan[f"{prefix}bias"] = WeightSource([TensorSlice(f"{name}.bias")])
        return plan
