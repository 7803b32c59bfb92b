"""What is particular to Mixture-of-Experts models: which layers are sparse, how the partition
weighs them (all experts' bytes for memory, the experts a decode step touches for time), the
TP constraint on the experts, and the block's routing against a plain per-token reference."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import MixtralConfig, Qwen3MoeConfig

from asyncpp.core.config import COST_SEQS, ModelShape
from asyncpp.core.stages import StageCosts, partition_layers, split_partition
from asyncpp.engine_args import check_tensor_parallel
from asyncpp.model import kernels
from asyncpp.model.moe import QWEN3_MOE_NAMES, SparseMoeBlock
from asyncpp.model.parallel import SingleRankGroup

SMALL = dict(vocab_size=1000, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers():
    qwen = ModelShape.of(Qwen3MoeConfig(**SMALL, num_hidden_layers=6, intermediate_size=128, moe_intermediate_size=32,
                                        num_experts=8, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert qwen.moe_layers == (1, 5) and qwen.expert_intermediate_size == 32 and qwen.num_experts == 8
    mixtral = ModelShape.of(MixtralConfig(**SMALL, num_hidden_layers=3, intermediate_size=48, num_local_experts=4))
    assert mixtral.moe_layers == (0, 1, 2) and mixtral.expert_intermediate_size == 48 and mixtral.num_experts == 4


def test_a_decode_step_reads_the_experts_its_tokens_pick():
    shape = ModelShape.of(MixtralConfig(**SMALL, num_hidden_layers=2, intermediate_size=48, num_local_experts=64))
    costs = shape.stage_costs(elem_bytes=1)
    touched = 64 * (1 - (1 - 2 / 64) ** COST_SEQS)  # ~40 of 64 experts for 32 tokens choosing 2 each
    assert costs.mlp == pytest.approx(64 * 64 + touched * 3 * 64 * 48)
    assert costs.mlp < 0.7 * 64 * 3 * 64 * 48  # well under all experts' bytes
    assert costs.layer_mlp == ()  # every layer alike


def test_the_partition_weighs_dense_and_sparse_layers_apart():
    """MoE layers 0..3 cost 10 per MLP half, dense layers 4..7 cost 1, attention 1: whole
    layers balance at 2 + 6 (22, 30), not 4 + 4 (44, 8); splitting layer 2 after its
    attention does better still (23, 29)."""
    costs = StageCosts(attention=1.0, mlp=10.0, first=0.0, last=0.0, layer_mlp=(10.0,) * 4 + (1.0,) * 4)
    assert costs.of([4, 4]) == [44.0, 8.0]
    assert split_partition(8, 2, costs, step=2) == [2, 6] and costs.of([2, 6]) == [22.0, 30.0]
    assert partition_layers(8, 2, costs=costs) == [2.5, 5.5] and costs.of([2.5, 5.5]) == [23.0, 29.0]
    shape = ModelShape.of(Qwen3MoeConfig(**SMALL, num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=64,
                                         num_experts=16, mlp_only_layers=[2, 3]))
    layer_mlp = shape.stage_costs(2).layer_mlp
    assert len(layer_mlp) == 4 and layer_mlp[0] == layer_mlp[1] > 5 * layer_mlp[2] and layer_mlp[2] == layer_mlp[3]


def test_tensor_parallel_must_divide_the_experts():
    shape = ModelShape.of(Qwen3MoeConfig(**SMALL, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=30,
                                         num_experts=4))
    with pytest.raises(ValueError, match="experts' intermediate size"):
        check_tensor_parallel(shape, 4)


@pytest.mark.parametrize("renormalize", [False, True])
def test_grouped_experts_match_a_per_token_reference(renormalize):
    torch.manual_seed(0)
    block = SparseMoeBlock(32, 16, num_experts=6, top_k=3, renormalize=renormalize, tp=SingleRankGroup(),
                           names=QWEN3_MOE_NAMES)
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(9, 32)
    expected = torch.zeros_like(x)
    for t in range(9):
        probs = torch.softmax(x[t] @ block.gate.weight.T, dim=-1)
        top, ids = probs.topk(3)
        top = top / top.sum() if renormalize else top
        for w, e in zip(top, ids.tolist()):
            gate, up = (x[t] @ block.experts[e].gate_up_proj.weight.T).chunk(2)
            expected[t] += w * (torch.nn.functional.silu(gate) * up) @ block.experts[e].down_proj.weight.T
    torch.testing.assert_close(block(x), expected)


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="compiled kernels not built")


def _random_block(hidden: int, inner: int, experts: int, top_k: int, dtype: torch.dtype) -> SparseMoeBlock:
    block = SparseMoeBlock(hidden, inner, num_experts=experts, top_k=top_k, renormalize=True, tp=SingleRankGroup(),
                           names=QWEN3_MOE_NAMES)
    for p in block.parameters():
        p.data = (torch.randn(p.shape) / p.shape[-1] ** 0.5).to(dtype)
    return block


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 9, 70])
def test_packed_experts_match_the_per_expert_gemms(dtype, tokens):
    """Tile tails (1-3 tokens an expert), a decode batch and a prefill chunk; bf16 rounds where
    transformers' bf16 code rounds, so it stays within a few bf16 steps of the per-expert path."""
    torch.manual_seed(tokens)
    block = _random_block(128, 96, experts=8, top_k=3, dtype=dtype)
    x = torch.randn(tokens, 128).to(dtype)
    expected = block(x)
    block.pack(None)
    assert len(block.experts) == 0 and block.packed_gate_up is not None
    got = block(x)
    assert got.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), expected.float(), **tol)


@needs_kernels
def test_experts_stay_per_expert_where_the_kernel_does_not_fit():
    int8 = _random_block(128, 96, experts=4, top_k=2, dtype=torch.float32)
    int8.pack("int8")
    odd = _random_block(128, 48, experts=4, top_k=2, dtype=torch.float32)  # 48 is not whole 32-column blocks
    odd.pack(None)
    assert len(int8.experts) == len(odd.experts) == 4 and int8.packed_gate_up is None and odd.packed_gate_up is None


_EVERY_BUILD = """
import torch
import asyncpp._kernels  # noqa: F401
from asyncpp.model.moe import QWEN3_MOE_NAMES, SparseMoeBlock
from asyncpp.model.parallel import SingleRankGroup
assert torch.ops.asyncpp.kernel_isa() == "{isa}", torch.ops.asyncpp.kernel_isa()
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
    block = SparseMoeBlock(128, 96, 8, 3, True, SingleRankGroup(), QWEN3_MOE_NAMES)
    for p in block.parameters():
        p.data = (torch.randn(p.shape) / p.shape[-1] ** 0.5).to(dtype)
    x = torch.randn(13, 128).to(dtype)
    expected = block(x)
    block.pack(None)
    torch.testing.assert_close(block(x).float(), expected.float(), atol=tol, rtol=tol)
"""


@needs_kernels
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_lesser_build_runs_the_experts_alike(isa):
    """The builds this host can run besides its best one, picked with ASYNCPP_KERNEL_ISA."""
    import subprocess
    import sys
    supported = {"avx512_bf16": 4, "avx512": 3, "avx2": 2, "generic": 1}
    if supported[isa] > supported[kernels.isa() or "generic"]:
        pytest.skip(f"this CPU cannot run the {isa} build")
    env = {**os.environ, "ASYNCPP_KERNEL_ISA": isa}
    subprocess.run([sys.executable, "-c", _EVERY_BUILD.format(isa=isa)], env=env, check=True, timeout=120)
