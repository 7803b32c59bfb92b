"""The compiled decode kernel against the torch path (both run PagedAttention's decode on the
same metadata): fp32, bf16 and fp8 caches, GQA groups, block sizes and head dims, windows and
sinks; and that the engine falls back to torch ops when the kernel is missing."""
from __future__ import annotations

import random

import pytest
import torch

from asyncpp.core.microbatch import SeqWork
from asyncpp.model import kernels
from asyncpp.model.attention import PagedAttention, allocate_kv_cache
from asyncpp.model.attention_metadata import HeadLayout, KernelDecode, build_metadata
from asyncpp.model.kv_quant import kv_format

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="compiled kernels not built")


def decode_seqs(num_seqs: int, block_size: int, num_blocks: int, seed: int = 0) -> list[SeqWork]:
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs = []
    for i in range(num_seqs):
        ctx = rng.choice([1, block_size, block_size + 1, rng.randint(2, 300)])
        seqs.append(SeqWork(i, [5], ctx - 1, [free.pop() for _ in range(-(-ctx // block_size))], None))
    return seqs


def both_paths(heads: int, kv_heads: int, head_dim: int, block_size: int, kv_dtype: torch.dtype,
               q_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    seqs = decode_seqs(9, block_size, 256)
    cache = allocate_kv_cache(1, 256, block_size, kv_heads, head_dim, kv_dtype, "cpu")[0]
    fmt = kv_format(kv_dtype)
    for t in cache:
        t.random_(0, 120) if fmt is not None else t.copy_(torch.randn(t.shape))
    q = torch.randn(len(seqs), heads, head_dim).to(q_dtype)
    attention = PagedAttention(heads, kv_heads, head_dim, head_dim ** -0.5)
    outs = []
    for kernel in (False, True):
        layout = HeadLayout(heads, kv_heads, head_dim, block_size, fmt, decode_kernel=kernel)
        meta = build_metadata(seqs, layout, "cpu")
        assert isinstance(meta.decode, KernelDecode) == kernel
        outs.append(attention._decode(q, cache, meta.decode, fmt).float())
    return outs[0], outs[1]


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (8, 8, 64, 16), (9, 3, 64, 16), (16, 2, 128, 32), (4, 1, 80, 8), (6, 6, 96, 16)])
def test_kernel_matches_torch_path_fp32(heads, kv_heads, head_dim, block_size):
    torch_path, kernel = both_paths(heads, kv_heads, head_dim, block_size, torch.float32, torch.float32)
    torch.testing.assert_close(kernel, torch_path, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_kernel_matches_torch_path_narrow_caches(kv_dtype):
    q_dtype = torch.bfloat16 if kv_dtype == torch.bfloat16 else torch.float32
    torch_path, kernel = both_paths(12, 4, 64, 16, kv_dtype, q_dtype)
    # bf16 outputs are rounded to bf16 by both paths (one ulp apart at most); fp8 reads the same
    # bytes, widened to values in the hundreds, summed in another order (measured 6e-5 relative).
    tolerance = 1e-2 if q_dtype == torch.bfloat16 else 2e-4
    torch.testing.assert_close(kernel, torch_path, rtol=tolerance, atol=tolerance * 100)


@needs_kernel
def test_kernel_windows_and_sinks_match_a_dense_reference():
    """first_pos (a sliding window's first position) and per-head sinks, against softmax over
    gathered K/V with the sink as one more logit that has no value."""
    torch.manual_seed(1)
    heads, kv_heads, head_dim, block_size = 8, 2, 64, 16
    seqs = decode_seqs(6, block_size, 128, seed=3)
    keys, values = allocate_kv_cache(1, 128, block_size, kv_heads, head_dim, torch.float32, "cpu")[0]
    keys.copy_(torch.randn(keys.shape))
    values.copy_(torch.randn(values.shape))
    q = torch.randn(len(seqs), heads, head_dim)
    sinks = torch.randn(heads)
    lens = torch.tensor([s.start_pos + 1 for s in seqs], dtype=torch.int32)
    first = (lens - 20).clamp(min=0).int()
    width = max(len(s.block_table) for s in seqs)
    tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)
    got = kernels.paged_decode_attention(q, keys, values, tables, lens, head_dim ** -0.5, first_pos=first,
                                         sinks=sinks)
    for i, s in enumerate(seqs):
        blocks = torch.tensor(s.block_table)
        k = keys[blocks].permute(1, 0, 3, 2).flatten(1, 2)[:, first[i]:lens[i]].repeat_interleave(4, 0)
        v = values[blocks].flatten(0, 1)[first[i]:lens[i]].transpose(0, 1).repeat_interleave(4, 0)
        logits = torch.cat([torch.einsum("hd,hld->hl", q[i], k) * head_dim ** -0.5, sinks[:, None]], dim=1)
        want = torch.einsum("hl,hld->hd", logits.softmax(-1)[:, :-1], v).reshape(-1)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def test_without_the_kernel_decodes_use_the_torch_path(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert not kernels.decode_kernel_fits("cpu", 16, 64)


def test_kernel_is_cpu_only_and_needs_multiples_of_eight():
    assert not kernels.decode_kernel_fits("meta", 16, 64)
    assert not kernels.decode_kernel_fits("cpu", 12, 64)
    assert not kernels.decode_kernel_fits("cpu", 16, 60)
