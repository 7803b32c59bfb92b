"""The 8-bit building blocks: int8 weights with per-token activation scales, and the fp8
bytes of the KV cache widened without torch's slow fp8 conversion."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asyncpp.model.int8 import Int8Weight
from asyncpp.model.kv_quant import Fp8Format


def test_int8_matmul_is_close_and_batch_invariant():
    torch.manual_seed(0)
    w, x, bias = torch.randn(96, 64) / 8, torch.randn(16, 64), torch.randn(96)
    q = Int8Weight.quantize(w)
    ref = F.linear(x, w, bias)
    y = q.matmul(x, bias)
    assert (y - ref).norm() / ref.norm() < 0.03  # measured 0.017 on W-like shapes
    for i in (0, 7, 15):  # a row alone gets exactly what it gets among the others
        assert torch.equal(q.matmul(x[i:i + 1], bias), y[i:i + 1])
    assert q.matmul(x.bfloat16(), None).dtype == torch.bfloat16
    assert q.matmul(x[:0], None).shape == (0, 96)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_widening_matches_torch_for_every_fp8_code(dtype):
    fmt = Fp8Format(dtype)
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(dtype).float()
    finite = torch.isfinite(ref)
    assert torch.equal(fmt.widen(codes, torch.float32)[finite] * fmt.k_unit, ref[finite])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_saturates_instead_of_overflowing(dtype):
    fmt = Fp8Format(dtype, k_scale=0.5)
    x = torch.tensor([1e6, -1e6, 0.0, 1.0])
    back = fmt.widen(fmt.quantize(x, fmt.k_scale), torch.float32) * fmt.k_unit
    limit = torch.finfo(dtype).max * 0.5
    assert back.tolist() == [limit, -limit, 0.0, 1.0]
