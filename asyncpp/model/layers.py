"""Norms and activations shared by the model files: torch ops, or on CPU the compiled fused
ones (kernels.py), one pass where torch takes several ops and allocations per layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncpp.model import kernels


def fused(x: torch.Tensor) -> bool:
    """Whether the compiled small ops run this tensor (CPU, float32 or bfloat16)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and kernels.available()


def fused_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """The compiled RMSNorm reads the residual and weight in x's dtype: otherwise the torch ops
    (which would round neither)."""
    return fused(x) and weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm that can first add the residual (vLLM-style fused residual stream).
    `round_normalized`: transformers' Llama rounds the normalized row to the dtype before the
    weight; gpt-oss multiplies in float32 and rounds once, as the torch op does."""

    def __init__(self, hidden: int, eps: float, round_normalized: bool = True):
        super().__init__()
        self.eps = eps
        self.round_normalized = round_normalized
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); residual None means x alone."""
        if fused_norm(x, residual, self.weight):
            out, total = torch.ops.asyncpp.rms_norm(x, residual, self.weight, self.eps, 0.0, self.round_normalized)
            return out, total if residual is not None else x
        if residual is not None:
            x = x + residual
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps), x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if fused(gate_up) and gate_up.stride(-1) == 1:
        return torch.ops.asyncpp.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}
