"""8-bit float KV cache: values stored as fp8 bytes with one scale for K and one for V.

Torch's fp8 -> float conversion on CPU costs ~2.5 ns an element (e4m3), more than reading
the bf16 cache it replaces. Both fp8 formats are bit-for-bit fp16 numbers in disguise, so
the cache is widened with integer ops instead: e5m2 is the high byte of an fp16, and e4m3's
seven exponent-and-mantissa bits shifted into an fp16's place give the value / 256 (its
subnormals included). The 256 and the scales fold into the query and the attention output.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

_E4M3_UNIT = 256.0  # e4m3 bits read as fp16 are the value / 2**8 (exponent bias 7 vs 15)
_CLEAR_BIT_14 = ~0x4000  # as an int16


@dataclass(frozen=True, slots=True)
class Fp8Format:
    dtype: torch.dtype  # torch.float8_e4m3fn | torch.float8_e5m2
    k_scale: float = 1.0  # stored = value / scale; 1.0 as vLLM without calibrated scales
    v_scale: float = 1.0

    @property
    def k_unit(self) -> float:
        """A widened K element times this is the value."""
        return self.k_scale * self._unit

    @property
    def v_unit(self) -> float:
        return self.v_scale * self._unit

    @property
    def _unit(self) -> float:
        return _E4M3_UNIT if self.dtype == torch.float8_e4m3fn else 1.0

    def quantize(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """x -> uint8 bytes of fp8(x / scale), saturated to the format's range (no inf, no nan)."""
        limit = torch.finfo(self.dtype).max
        return (x.float() / scale).clamp_(-limit, limit).to(self.dtype).view(torch.uint8)

    def widen(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 bytes -> `dtype`, each element value / unit (see k_unit, v_unit).

        Read as int8 and sign-extended, the byte's sign lands in bit 15 either way: e5m2
        shifted by 8 is its fp16; e4m3 shifted by 7 also copies the sign into bit 14,
        which the mask clears. Each step is one in-place pass over int16s."""
        bits = stored.view(torch.int8).to(torch.int16)
        if self.dtype == torch.float8_e4m3fn:
            bits.bitwise_left_shift_(7).bitwise_and_(_CLEAR_BIT_14)
        else:
            bits.bitwise_left_shift_(8)
        return bits.view(torch.float16).to(dtype)


    @property
    def kernel_kind(self) -> int:
        """The compiled kernel's code for this format (csrc/decode_attention.h KVKind)."""
        return 2 if self.dtype == torch.float8_e4m3fn else 3

    def table(self) -> torch.Tensor:
        """Every byte widened as `widen` does: the compiled kernel looks its elements up here."""
        return _tables(self.dtype)


@functools.cache
def _tables(dtype: torch.dtype) -> torch.Tensor:
    return Fp8Format(dtype).widen(torch.arange(256, dtype=torch.uint8), torch.float32)


def kv_format(kv_dtype: torch.dtype) -> Fp8Format | None:
    """None: the cache holds the model's dtype."""
    return Fp8Format(kv_dtype) if kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else None


def storage_dtype(kv_dtype: torch.dtype) -> torch.dtype:
    return torch.uint8 if kv_format(kv_dtype) else kv_dtype
