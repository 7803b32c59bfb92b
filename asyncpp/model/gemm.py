"""Linear layers' matmul: oneDNN with prepacked weights on CPU, int8 weights through fbgemm
when quantized, F.linear elsewhere.

On CPU, oneDNN's GEMM on a weight reordered once into its blocked layout runs 1.3-2x
faster than F.linear (MKL) at decode batch sizes (M ~ 8..128) and ~1.2x at prefill sizes;
the 32000-row LM head gains the most. The ops are the ones Inductor's CPU freezing pass
uses (torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise). Results are fp32 GEMMs,
only summed in a different order than MKL's.

bfloat16 models: where the CPU has bf16 instructions (AVX512-BF16, AMX) the weights are
packed in bf16. Without them (AVX2) oneDNN and MKL emulate bf16 GEMMs 4-5x slower than
fp32, so the weights are widened once to fp32 (exactly: every bf16 value is an fp32 value)
and packed; activations, KV cache and everything between the GEMMs stay bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncpp.model.int8 import Int8Weight

_BATCH_HINT = 32  # oneDNN picks the blocked layout for this M; measured insensitive in 8..2048

GemmWeight = torch.Tensor | Int8Weight


def onednn_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def native_bf16() -> bool:
    """True when this CPU has bf16 GEMM instructions oneDNN uses."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(x: torch.Tensor, weight: GemmWeight, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ weight.T + bias, in `out_dtype` (default x's): the LM head asks for float32
    logits, which a widened bf16 GEMM has already computed."""
    out_dtype = out_dtype or x.dtype
    if isinstance(weight, Int8Weight):
        return weight.matmul(x, bias, out_dtype)
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias).to(out_dtype)
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[0], dtype=out_dtype)
    if x.dtype == weight.dtype == out_dtype:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = torch.ops.mkldnn._linear_pointwise(x.to(weight.dtype), weight, None, "none", [], "").to(out_dtype)
    return y if bias is None else y.add_(bias)


def prepack(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach()
    if w.dtype == torch.bfloat16 and not native_bf16():
        w = w.float()
    return torch.ops.mkldnn._reorder_linear_weight(w, _BATCH_HINT)


class PackableLinear(nn.Module):
    """A module whose `weight` [out, in] feeds `linear()` and may be prepacked or quantized."""
    weight: nn.Parameter
    packed: GemmWeight | None = None

    @property
    def gemm_weight(self) -> GemmWeight:
        return self.weight if self.packed is None else self.packed

    def prepare(self, quantization: str | None, shared: bool) -> None:
        """Turn the weight into its GEMM operand: int8 when quantized ("int8"), else
        prepacked for oneDNN. Shared weights (a tied LM head) keep their dense parameter
        and get a GEMM copy."""
        operand: GemmWeight = (Int8Weight.quantize(self.weight) if quantization == "int8"
                               else prepack(self.weight))
        if shared:
            self.packed = operand
        elif isinstance(operand, Int8Weight):
            self.packed = operand
            self.weight = nn.Parameter(self.weight.new_empty(0, self.weight.shape[1]), requires_grad=False)
        else:
            self.weight = nn.Parameter(operand, requires_grad=False)  # same values, new layout


class PacksExperts(nn.Module):
    """A module that packs several linears' weights into one operand of its own (an MoE block's
    experts for the compiled kernel), before the remaining linears are prepared one by one."""

    def pack(self, quantization: str | None) -> None:
        raise NotImplementedError


def prepare_model(model: nn.Module, quantization: str | None) -> None:
    for module in list(model.modules()):
        if isinstance(module, PacksExperts):
            module.pack(quantization)
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for module in model.modules():
        if isinstance(module, PackableLinear):
            module.prepare(quantization, shared=owners[id(module.weight)] > 1)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights, which live outside the parameters."""
    return sum(m.packed.nbytes for m in model.modules()
               if isinstance(m, PackableLinear) and isinstance(m.packed, Int8Weight))
