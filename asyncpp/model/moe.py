"""Sparse Mixture-of-Experts MLP (Qwen3-MoE, Mixtral; DeepSeek's routing and shared experts
build on it in deepseek.py): a replicated router, softmax, top-k, the model's own
normalisation of the top-k weights, SwiGLU experts, optionally shared experts every token runs.

Tokens are grouped by expert (a sort of the flattened top-k choices), so each expert that has
tokens runs one GEMM over all of them; the weighted results are summed back per token. Every
expert is held as its own 2-D weights, so oneDNN prepacks (or int8 quantizes) each one as it
does a dense linear: at decode sizes (a few tokens per expert) a prepacked expert GEMM ran
~2x faster than F.linear on a slice of a fused 3-D tensor on this CPU.

Under TP each rank holds a slice of every expert's intermediate dimension (Megatron, as a dense
MLP): the router's choices are the same on every rank, and the block ends with one all-reduce.

Checkpoints come in two layouts, both read: the published one, a tensor per expert and
projection (`experts.7.gate_proj.weight`; Mixtral's `block_sparse_moe.experts.7.w1.weight`),
which transformers 5 also writes by default; and the fused per-layer one that
`save_pretrained(save_original_format=False)` writes (`mlp.experts.gate_up_proj`
[experts, 2 * inner, hidden], `mlp.experts.down_proj` [experts, hidden, inner]).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from asyncpp.model import packed_experts
from asyncpp.model.gemm import PackableLinear, PacksExperts, linear
from asyncpp.model.layers import silu_and_mul
from asyncpp.model.linear import ColumnParallelLinear, RowParallelLinear
from asyncpp.model.loader import TensorSlice, WeightPlan, WeightSource, cols, rows, whole
from asyncpp.model.parallel import TPGroup


@dataclass(frozen=True, slots=True)
class ExpertNames:
    """How the published layout names one MoE block's tensors."""
    block: str  # the block within its layer (the fused layout always says `mlp`)
    gate: str
    up: str
    down: str


QWEN3_MOE_NAMES = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ExpertNames("block_sparse_moe", "w1", "w3", "w2")


class Router(PackableLinear):
    """The [experts, hidden] gate, whole on every rank. Prepacked, never quantized: the top-k
    choices stay the checkpoint's. `dtype`: float32 where the model keeps its router in float32
    (DeepSeek); default: the model's."""

    def __init__(self, hidden: int, num_experts: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype), requires_grad=False)

    def prepare(self, quantization: str | None, shared: bool) -> None:
        super().prepare(None, shared)


class Expert(nn.Module):
    """One expert's SwiGLU weights, this rank's slice of its intermediate dimension. The
    block calls their GEMMs itself (the down projection's all-reduce is the block's, once)."""

    def __init__(self, hidden: int, inner: int, tp: TPGroup):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [inner, inner], tp)
        self.down_proj = RowParallelLinear(inner, hidden, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(silu_and_mul(linear(x, self.gate_up_proj.gemm_weight)), self.down_proj.gemm_weight)


class SparseMoeBlock(PacksExperts):
    """`shared_inner` > 0: shared experts (one SwiGLU MLP of that width) beside the routed ones,
    their output added before the block's one all-reduce. `gate`: a router of the model's own.

    On CPU, once loaded, plain SwiGLU experts are packed for the compiled kernel
    (packed_experts.py) and their per-expert modules dropped; int8 experts, other expert kinds
    and a build without kernels keep the per-expert GEMMs."""

    def __init__(self, hidden: int, inner: int, num_experts: int, top_k: int, renormalize: bool, tp: TPGroup,
                 names: ExpertNames, shared_inner: int = 0, gate: Router | None = None,
                 expert: Callable[[], nn.Module] | None = None):
        super().__init__()
        self.tp, self.top_k, self.renormalize, self.names = tp, top_k, renormalize, names
        self.inner = inner
        self.gate = gate or Router(hidden, num_experts)
        self.experts = nn.ModuleList((expert or (lambda: Expert(hidden, inner, tp)))() for _ in range(num_experts))
        self.shared_experts = Expert(hidden, shared_inner, tp) if shared_inner else None
        self.packed_gate_up: nn.Parameter | None = None
        self.packed_down: nn.Parameter | None = None

    def pack(self, quantization: str | None) -> None:
        if quantization or not all(type(e) is Expert for e in self.experts):
            return
        gate_up = [e.gate_up_proj.weight for e in self.experts]
        down = [e.down_proj.weight for e in self.experts]
        if not packed_experts.fits(gate_up[0].device, gate_up[0].dtype, down[0].shape[0], down[0].shape[1]):
            return
        self.packed_gate_up = nn.Parameter(packed_experts.pack_gate_up(torch.stack(gate_up)), requires_grad=False)
        self.packed_down = nn.Parameter(packed_experts.pack_down(torch.stack(down)), requires_grad=False)
        self.experts = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.routed(x)
        if self.shared_experts is not None:
            y += self.shared_experts(x)
        self.tp.all_reduce(y)
        return y

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the chosen experts' weighted outputs."""
        weights, chosen = self.route(x)
        if self.packed_gate_up is not None and self.packed_down is not None:
            return packed_experts.routed_swiglu(x, self.packed_gate_up, self.packed_down, weights, chosen)
        flat = chosen.view(-1)
        order = flat.argsort(stable=True)  # (token, choice) slots grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tokens = order // self.top_k
        grouped = x.index_select(0, tokens)
        out = torch.empty_like(grouped)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                out[start:start + n] = expert(grouped[start:start + n])
                start += n
        out.mul_(weights.view(-1)[order].unsqueeze(1))
        return torch.zeros_like(x).index_add_(0, tokens, out)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts and their weights (softmax in float32, as transformers)."""
        probs = torch.softmax(linear(x, self.gate.gemm_weight).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), chosen

    def plan(self, prefix: str, name: str) -> WeightPlan:
        """`name`: the layer's `mlp.`; the published layout first, the fused one as its fallback."""
        block = f"{name.removesuffix('mlp.')}{self.names.block}."
        plan = {f"{prefix}gate.weight": WeightSource([TensorSlice(f"{block}gate.weight")],
                                                     fallback=whole(f"{name}gate.weight"))}
        local = self.inner // self.tp.size
        a, b = self.tp.rank * local, (self.tp.rank + 1) * local
        gate_up, down, n = f"{name}experts.gate_up_proj", f"{name}experts.down_proj", self.names
        for e in range(len(self.experts)):
            published = f"{block}experts.{e}."
            plan[f"{prefix}experts.{e}.gate_up_proj.weight"] = WeightSource(
                [rows(f"{published}{n.gate}.weight", a, b), rows(f"{published}{n.up}.weight", a, b)],
                fallback=WeightSource([TensorSlice(gate_up, 0, a, b, expert=e),
                                       TensorSlice(gate_up, 0, self.inner + a, self.inner + b, expert=e)]))
            plan[f"{prefix}experts.{e}.down_proj.weight"] = WeightSource(
                [cols(f"{published}{n.down}.weight", a, b)],
                fallback=WeightSource([TensorSlice(down, 1, a, b, expert=e)]))
        if self.shared_experts is not None:
            local = self.shared_experts.down_proj.in_local
            a, b, shared = self.tp.rank * local, (self.tp.rank + 1) * local, f"{block}shared_experts."
            plan[f"{prefix}shared_experts.gate_up_proj.weight"] = WeightSource(
                [rows(f"{shared}{n.gate}.weight", a, b), rows(f"{shared}{n.up}.weight", a, b)])
            plan[f"{prefix}shared_experts.down_proj.weight"] = WeightSource([cols(f"{shared}{n.down}.weight", a, b)])
        return plan
