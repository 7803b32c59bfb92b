"""Rotary position embedding (rotate-half / NeoX layout, as Hugging Face Llama), over the
whole head or, with `partial_rotary_factor` < 1 (Phi-4-mini), over its first part only."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from asyncpp.model.layers import fused

# RoPE variants whose frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """rope_theta and scaling from either layout: transformers >= 5 keeps them in
    `rope_parameters`; older configs have `rope_theta` and `rope_scaling`. Models with a
    rotary per layer type (Gemma 3) key them by `layer_type`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if layer_type is not None:
        params = dict(params[layer_type] or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    if not params:
        params = dict(scaling)
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def rotary_dim(hf_config: Any, head_dim: int, layer_type: str | None = None) -> int:
    """The leading part of each head that rotates (transformers: int(head_dim * factor))."""
    return int(head_dim * rope_parameters(hf_config, layer_type).get("partial_rotary_factor", 1.0))


def inverse_frequencies(hf_config: Any, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    params = rope_parameters(hf_config, layer_type)
    if params["rope_type"] == "default":
        base, dim = float(params["rope_theta"]), rotary_dim(hf_config, head_dim, layer_type)
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    by_type = {} if layer_type is None else {"layer_type": layer_type}
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config, torch.device("cpu"), **by_type)


class RotaryEmbedding(nn.Module):
    """cos/sin for every position computed once; a step only indexes the table."""

    def __init__(self, hf_config: Any, head_dim: int, max_positions: int, dtype: torch.dtype,
                 layer_type: str | None = None):
        super().__init__()
        inv_freq, scaling = inverse_frequencies(hf_config, head_dim, layer_type)
        positions = torch.arange(max_positions, dtype=torch.float)
        freqs = positions[:, None] * inv_freq.to(positions.device)[None, :]
        table = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)
        self.register_buffer("cos_sin", table.to(dtype), persistent=False)
        self.half = rotary_dim(hf_config, head_dim, layer_type) // 2

    def at(self, positions: torch.Tensor) -> "RopeAt":
        return RopeAt(self, positions)


class RopeAt:
    """cos/sin for one step's positions, looked up once and shared by every layer."""
    __slots__ = ("cos", "sin", "half", "table")

    def __init__(self, rotary: RotaryEmbedding, positions: torch.Tensor):
        rows = rotary.cos_sin[positions]
        self.cos, self.sin = rows.unsqueeze(1).chunk(2, dim=-1)
        self.half = rotary.half
        # The compiled op reads float32 [tokens, 2 * half]: the model dtype's values, widened.
        self.table = rows.float().contiguous() if fused(rows) else None

    def apply(self, x: torch.Tensor) -> None:
        """Rotate x [tokens, heads, head_dim] in place (rotate-half layout)."""
        if self.table is not None and x.dtype in (torch.float32, torch.bfloat16) and x.stride(-1) == 1 \
                and x.stride(-2) == x.shape[-1]:
            torch.ops.asyncpp.rotary_(x, self.table, x.shape[1])
            return
        x1, x2 = x[..., : self.half], x[..., self.half: 2 * self.half]
        rotated1 = x1 * self.cos - x2 * self.sin
        x2.mul_(self.cos).addcmul_(x1, self.sin)
        x1.copy_(rotated1)
