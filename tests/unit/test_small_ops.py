"""The fused small ops (RMSNorm with its residual add, SiLU x mul, rotary) on either path:
the compiled kernels and the torch ops they fall back to, each against transformers'
formulas written out here; bfloat16 within a rounding step, float32 nearly exact."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from asyncpp.model import kernels
from asyncpp.model.gemma3 import GemmaRMSNorm
from asyncpp.model.layers import RMSNorm, silu_and_mul
from asyncpp.model.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6


@pytest.fixture(params=["torch", "kernel"])
def path(request, monkeypatch) -> str:
    """Each test runs once per path; the kernel's is skipped where it is not built or is off."""
    if request.param == "kernel" and not kernels.available():
        pytest.skip("compiled kernels not built or ASYNCPP_NO_KERNELS set")
    if request.param == "torch":
        monkeypatch.setattr(kernels, "available", lambda: False)
    return request.param


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32: the same sums in another order; bfloat16: at most a rounding step or so apart."""
    assert got.dtype == want.dtype
    tol = 1e-5 if got.dtype == torch.float32 else 2 ** -6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def rows(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalized in float32, rounded, then times the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * h.to(x.dtype)


def gpt_oss_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' GptOssRMSNorm: times the weight in float32, rounded once."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return (weight * h).to(x.dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' GemmaRMSNorm: times (1 + w) in float32, rounded once."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return (h * (1.0 + weight.float())).to(x.dtype)


def rms_norm_module(width: int, dtype: torch.dtype, cls: type = RMSNorm, **kwargs: bool) -> torch.nn.Module:
    norm = cls(width, EPS, **kwargs)
    norm.weight.data = rows(width, dtype=dtype, seed=9)
    return norm


# 100 and 37 leave a tail shorter than the kernel's 16-float vectors.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 100, 2048])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_adds_the_residual_and_normalizes(path, dtype, width, with_residual):
    x, residual = rows(5, width, dtype=dtype), rows(5, width, dtype=dtype, seed=1)
    norm = rms_norm_module(width, dtype)
    out, total = norm(x, residual if with_residual else None)
    want_total = x + residual if with_residual else x
    torch.testing.assert_close(total, want_total, rtol=0, atol=0)  # the stream itself is exact
    close(out, llama_rms_norm(want_total, norm.weight))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_gpt_oss_rms_norm_rounds_once(path, dtype, with_residual):
    x, residual = rows(5, 100, dtype=dtype), rows(5, 100, dtype=dtype, seed=1)
    norm = rms_norm_module(100, dtype, round_normalized=False)
    out, total = norm(x, residual if with_residual else None)
    close(out, gpt_oss_rms_norm(total, norm.weight))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_over_heads_of_a_strided_view(path, dtype):
    """Qwen3's per-head q/k norms and MLA's latent norm see views, not whole rows."""
    qkv = rows(6, 3, 80, dtype=dtype)
    heads = qkv[:, :2]
    norm = rms_norm_module(80, dtype)
    close(norm(heads)[0], llama_rms_norm(heads, norm.weight))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 100])
def test_gemma_rms_norm_scales_by_one_plus_the_weight(path, dtype, width):
    x = rows(5, 2, width, dtype=dtype)
    norm = rms_norm_module(width, dtype, GemmaRMSNorm)
    close(norm(x), gemma_rms_norm(x, norm.weight))


@pytest.mark.skipif(not kernels.available(), reason="compiled kernels not built or ASYNCPP_NO_KERNELS set")
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernel_gemma_variant_with_a_residual(dtype):
    """weight_offset 1 with a residual: no model uses it yet; the op's contract holds anyway."""
    x, residual, weight = rows(4, 100, dtype=dtype), rows(4, 100, dtype=dtype, seed=1), rows(100, dtype=dtype, seed=2)
    out, total = torch.ops.asyncpp.rms_norm(x, residual, weight, EPS, 1.0, False)
    torch.testing.assert_close(total, x + residual, rtol=0, atol=0)
    close(out, gemma_rms_norm(x + residual, weight))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 64), (2, 3, 2 * 37)])
def test_silu_and_mul(path, dtype, shape):
    gate_up = rows(*shape, dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    close(silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_of_rows_with_a_stride(path, dtype):
    wide = rows(5, 3 * 48, dtype=dtype)
    gate_up = wide[:, : 2 * 48]
    gate, up = gate_up.chunk(2, dim=-1)
    close(silu_and_mul(gate_up), F.silu(gate) * up)


def rotary(head_dim: int, dtype: torch.dtype, partial: float = 1.0) -> RotaryEmbedding:
    config = SimpleNamespace(rope_parameters={"rope_theta": 10000.0, "rope_type": "default",
                                              "partial_rotary_factor": partial})
    return RotaryEmbedding(config, head_dim, 64, dtype)


def hf_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on the first rot_dim dims (rotate-half), the rest passed through."""
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot[..., : rot_dim // 2], x_rot[..., rot_dim // 2:]
    rotated = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, x_pass], dim=-1)


def expected_rotation(rope: RotaryEmbedding, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    cos, sin = rope.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    return hf_rotate(x, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1), 2 * rope.half)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,partial", [(64, 1.0), (80, 1.0), (96, 0.75), (64, 0.5)])
def test_rotary_rotates_q_and_k_in_place_and_leaves_v(path, dtype, head_dim, partial):
    """Llama's call: the q and k heads of a qkv row rotate, v's do not; a partial factor
    (Phi-4-mini) rotates the leading part of each head only."""
    rope = rotary(head_dim, dtype, partial)
    positions = torch.tensor([0, 1, 5, 63, 17])
    qkv = rows(5, 4 + 2 + 2, head_dim, dtype=dtype)
    want = expected_rotation(rope, positions, qkv[:, :6])
    v_before = qkv[:, 6:].clone()
    rope.at(positions).apply(qkv[:, :6])
    close(qkv[:, :6], want)
    torch.testing.assert_close(qkv[:, 6:], v_before, rtol=0, atol=0)


@pytest.mark.skipif(not kernels.available(), reason="compiled kernels not built or ASYNCPP_NO_KERNELS set")
def test_the_rotary_kernel_rounds_bf16_as_transformers_does():
    """Each product rounded to bfloat16 before the sum: no difference at all."""
    rope = rotary(64, torch.bfloat16)
    positions = torch.arange(0, 64, 3)
    x = rows(len(positions), 4, 64, dtype=torch.bfloat16)
    want = expected_rotation(rope, positions, x)
    rope.at(positions).apply(x)
    torch.testing.assert_close(x, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_of_the_rope_part_of_each_head(path, dtype):
    """MLA's calls: the trailing rope dims of each query head (heads not contiguous: the torch
    path) and the one shared key head inside the latent entry (a row stride)."""
    rope = rotary(32, dtype)
    positions = torch.tensor([3, 4, 40])
    q, entry = rows(3, 4, 48 + 32, dtype=dtype), rows(3, 128 + 32, dtype=dtype, seed=1)
    q_want = expected_rotation(rope, positions, q[..., 48:])
    k_want = expected_rotation(rope, positions, entry[:, None, 128:])
    at = rope.at(positions)
    at.apply(q[..., 48:])
    at.apply(entry[:, None, 128:])
    close(q[..., 48:], q_want)
    close(entry[:, None, 128:], k_want)


class _Refused:
    def __getattr__(self, name: str):
        raise AssertionError(f"torch.ops.asyncpp.{name} called with the kernels off")


def test_with_the_kernels_off_no_compiled_op_runs(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(torch.ops, "asyncpp", _Refused())
    rope = rotary(64, torch.float32)
    at = rope.at(torch.tensor([1, 2]))
    assert at.table is None
    at.apply(rows(2, 3, 64, dtype=torch.float32))
    rms_norm_module(64, torch.float32)(rows(2, 64, dtype=torch.float32), rows(2, 64, dtype=torch.float32))
    rms_norm_module(64, torch.float32, GemmaRMSNorm)(rows(2, 64, dtype=torch.float32))
    silu_and_mul(rows(2, 128, dtype=torch.float32))
