"""MXFP4 (OCP microscaling FP4), the published gpt-oss checkpoints' expert format, read by
dequantizing.

A weight [rows, cols] is stored as `<name>_blocks` uint8 [rows, cols / 32, 16]: each byte two
e2m1 values (the low nibble first), and `<name>_scales` uint8 [rows, cols / 32]: one E8M0
exponent (biased by 127) per 32 values of a row. Every e2m1 value times a power of two is
exact in float32 and bfloat16, so dequantizing loses nothing.
"""
from __future__ import annotations

import torch

GROUP = 32  # values per scale
# e2m1 nibble -> value (transformers' FP4_VALUES: sign bit 3, then exponent and mantissa)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., groups, 16], scales uint8 [..., groups] -> float32 [..., groups * 32]."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1).flatten(-2)
    return torch.ldexp(values, scales.to(torch.int32).sub(127).unsqueeze(-1)).flatten(-2)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., cols] (cols a multiple of 32) -> (blocks, scales): each group's scale is the power of
    two that brings its largest magnitude within e2m1's 6, each value rounded to the nearest e2m1
    (ties to the smaller magnitude). For the tiny test checkpoints in the published layout."""
    groups = weight.float().unflatten(-1, (-1, GROUP))
    amax = groups.abs().amax(dim=-1).clamp_(min=2.0 ** -126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp_(-127, 127)
    scaled = groups / torch.ldexp(torch.ones_like(exponent), exponent.int()).unsqueeze(-1)
    magnitudes = torch.tensor(FP4_VALUES[:8])
    nearest = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # first (smaller) on a tie
    nibbles = (nearest | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)
