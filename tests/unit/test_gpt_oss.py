"""gpt-oss beyond the shared family tests (test_family_runners, test_family_engines): MXFP4
experts (the published layout) read by dequantizing each rank's slices, the MoE block against
transformers' (router bias, interleaved clamped SwiGLU, expert biases), the torch decode path
with sinks in windows (where the compiled kernel runs the decodes)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import GptOssConfig, Mxfp4Config

from asyncpp.core.config import ModelShape
from asyncpp.model import loader, mxfp4
from asyncpp.model.gpt_oss import GptOssMoeBlock
from asyncpp.model.parallel import SingleRankGroup
from asyncpp.testing.tiny_model import make_gpt_oss
from asyncpp.worker.model_runner import ModelRunner
from helpers.driver import GlooGroup, engine_config, generate, runners_for
from helpers.parity import hf_greedy, mixed_prompts


def test_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8)
    scales = torch.randint(100, 140, (3, 10, 4), dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [experts, cols, rows]
    assert torch.equal(mxfp4.dequantize(blocks, scales), theirs.transpose(1, 2))


@pytest.mark.parametrize(("dim", "start", "stop"), [(0, 3, 9), (1, 40, 80), (1, 0, 32), (None, 0, None)])
def test_a_slice_reads_the_groups_that_cover_it(tmp_path, dim, start, stop):
    """Rows, or columns cutting 32-value groups, of expert 1 of a [3, 10, 128] MXFP4 weight."""
    torch.manual_seed(0)
    blocks, scales = mxfp4.quantize(torch.randn(3, 10, 128))
    save_file({"w_blocks": blocks, "w_scales": scales}, tmp_path / "model.safetensors")
    full = mxfp4.dequantize(blocks, scales)[1]
    expected = full if dim is None else full[start:stop] if dim == 0 else full[:, start:stop]
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(expected.shape), requires_grad=False)
    plan = {"weight": loader.WeightSource([loader.TensorSlice("w_blocks", dim, start, stop, expert=1, mxfp4=True)])}
    loader.load_weights(holder, loader.Checkpoint.open(tmp_path), plan)
    assert torch.equal(holder.weight, expected)


def test_the_moe_block_matches_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    torch.manual_seed(0)
    cfg = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=8, num_experts_per_tok=3,
                       num_hidden_layers=1, swiglu_limit=1.5)  # a low limit, so the clamps bite
    theirs = GptOssMLP(cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.5)
    ours = GptOssMoeBlock(cfg, ModelShape.of(cfg), SingleRankGroup())
    ours.gate.weight.data.copy_(theirs.router.weight)
    ours.gate.bias.data.copy_(theirs.router.bias)
    for e, expert in enumerate(ours.experts):
        expert.gate_up_proj.weight.data.copy_(theirs.experts.gate_up_proj[e].T)
        expert.gate_up_proj.bias.data.copy_(theirs.experts.gate_up_proj_bias[e])
        expert.down_proj.weight.data.copy_(theirs.experts.down_proj[e].T)
        expert.down_proj.bias.data.copy_(theirs.experts.down_proj_bias[e])
    x = torch.randn(20, 32)
    with torch.no_grad():
        expected = theirs(x[None])[0][0]
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mxfp4_and_dense_checkpoints_load_alike(tmp_path):
    """The published MXFP4 layout and the dense one transformers writes give the same weights:
    at P=2 with layer 2 split, and on each rank of T=2 (its 48 of the 96 inner columns cut
    32-value groups); transformers' own MXFP4 reader (dequantize=True) reads our MXFP4 file to
    the dense model's weights too."""
    from transformers import AutoModelForCausalLM

    dense, packed = make_gpt_oss(tmp_path / "dense"), make_gpt_oss(tmp_path / "mxfp4", mxfp4=True)
    for layout in [dict(pp=2, pp_layer_partition="2.5,1.5"), dict(tensor_parallel_size=2)]:
        ours, theirs = (_params(d, **layout) for d in (dense, packed))
        assert [list(a) for a in ours] == [list(b) for b in theirs]
        assert all(torch.equal(a[k], b[k]) for a, b in zip(ours, theirs) for k in a)
    torch.set_num_threads(1)
    prompts = mixed_prompts(8, 1, 300)
    runners = runners_for(packed, pp=2, pp_layer_partition="2.5,1.5")
    assert generate(runners, prompts, 12, chunk=64) == hf_greedy(dense, prompts, 12)
    reference = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).state_dict()
    read = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32,
                                                quantization_config=Mxfp4Config(dequantize=True)).state_dict()
    assert all(torch.equal(reference[k], read[k]) for k in reference)


def _params(model_dir, tensor_parallel_size: int = 1, **layout) -> list[dict[str, torch.Tensor]]:
    """Every rank's parameters (T > 1: each rank built alone; loading needs no collective)."""
    config = engine_config(model_dir, tensor_parallel_size=tensor_parallel_size, onednn=False,
                           distributed_executor_backend="mp" if tensor_parallel_size > 1 else None, **layout)
    return [dict(ModelRunner(config, stage, GlooGroup(stage.tp_rank, stage.tp_size)).model.named_parameters())
            for stage in config.stages]


def test_torch_decode_path_matches_transformers(gpt_oss_dir):
    """Sinks and windows where the compiled kernel does not run (GPU, no compiler): the
    embedding_bag decode with its extra softmax column."""
    torch.set_num_threads(1)
    prompts = mixed_prompts(8, 1, 300)
    runners = runners_for(gpt_oss_dir)
    runners[0].layout = dataclasses.replace(runners[0].layout, decode_kernel=False)
    assert generate(runners, prompts, 12, chunk=64) == hf_greedy(gpt_oss_dir, prompts, 12)
