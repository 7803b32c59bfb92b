"""The newer families (Qwen3, Qwen3-MoE, Mixtral, Phi-3, DeepSeek-V3, gpt-oss) through ModelRunners in
this process: greedy fp32 token ids must match transformers' generate() exactly at P=1, P=2
with a second virtual engine, P=3 with stages split inside layers, and each stage must load
only its share of the checkpoint.
The multi-process layouts (P=2 V=2 with shared prefixes, P=2 x T=2): integration/test_family_engines.py."""
from __future__ import annotations

import pytest
import torch

from asyncpp.model.loader import Checkpoint
from helpers.driver import generate, runners_for
from helpers.models import checkpoint_share, make_mixtral, make_phi3, make_qwen3_moe
from helpers.parity import hf_greedy, mixed_prompts

MAX_NEW = 12
FAMILIES = ["qwen3", "qwen3_moe", "mixtral", "phi3", "deepseek_v3", "gpt_oss"]
TIED = {"qwen3"}  # the fixtures with a tied LM head
SPLIT = "2.5,1.5"  # layer 2: attention on stage 0, its MoE block on stage 1


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return mixed_prompts(8, 1, 300)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def family_dir(request, family):
    return request.getfixturevalue(f"{family}_dir")


def test_one_stage_matches_transformers(family_dir, prompts):
    torch.set_num_threads(1)
    assert generate(runners_for(family_dir), prompts, MAX_NEW, chunk=64) == hf_greedy(family_dir, prompts, MAX_NEW)


def test_two_stages_second_virtual_engine_and_sampler(family_dir, prompts):
    torch.set_num_threads(1)
    runners = runners_for(family_dir, pp=2, num_ves=2)
    got = generate(runners, prompts, MAX_NEW, chunk=48, admit_per_step=3, ve_id=1, use_sampler=True)
    assert got == hf_greedy(family_dir, prompts, MAX_NEW)


def test_three_stages_split_inside_layers(family_dir, prompts):
    torch.set_num_threads(1)
    runners = runners_for(family_dir, pp=3, pp_layer_partition="1.5,1,1.5")
    assert [r.stage.kv_layers for r in runners] == [2, 1, 1]
    got = generate(runners, prompts, MAX_NEW, chunk=100, admit_per_step=4)
    assert got == hf_greedy(family_dir, prompts, MAX_NEW)


def test_each_stage_loads_its_share(family, family_dir):
    for pp, partition in [(1, None), (2, "2.5,1.5"), (3, "1.5,1,1.5")]:
        runners = runners_for(family_dir, pp=pp, pp_layer_partition=partition)
        assert [r.param_bytes() for r in runners] == [checkpoint_share(family_dir, r.stage, family in TIED)
                                                      for r in runners]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_published_and_fused_expert_layouts_load_alike(request, family, tmp_path, prompts):
    """The published per-expert tensors (the fixture, as transformers writes by default) and
    the fused per-layer ones (save_original_format=False) give the same weights, and so the
    same tokens, here at P=2 with layer 2's MoE block on the second stage."""
    published = request.getfixturevalue(f"{family}_dir")
    fused = {"qwen3_moe": make_qwen3_moe, "mixtral": make_mixtral}[family](tmp_path, fused=True)
    names = Checkpoint.open(fused).files
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and not any(".experts.0." in n for n in names)
    ours, theirs = ([dict(r.model.named_parameters())
                     for r in runners_for(d, pp=2, pp_layer_partition=SPLIT, onednn=False)] for d in (published, fused))
    assert [list(a) for a in ours] == [list(b) for b in theirs]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ours, theirs) for k in a)
    runners = runners_for(fused, pp=2, pp_layer_partition=SPLIT)
    assert generate(runners, prompts, MAX_NEW, chunk=64) == hf_greedy(published, prompts, MAX_NEW)


def test_phi4_mini_shape_longrope_partial_rotary_tied(tmp_path, prompts):
    """LongRoPE's short factors and attention factor (within the original 512 positions),
    rotary over the first 12 of 16 dimensions of each head, a tied head."""
    torch.set_num_threads(1)
    model_dir = make_phi3(tmp_path, longrope=True, partial_rotary_factor=0.75, tie=True)
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    assert generate(runners_for(model_dir, max_model_len=512), prompts, MAX_NEW, chunk=64) == expected
    runners = runners_for(model_dir, pp=3, pp_layer_partition="1.5,1,1.5", max_model_len=512)
    assert generate(runners, prompts, MAX_NEW, chunk=100, admit_per_step=4) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_transformers(family_dir, prompts):
    runners = runners_for(family_dir, pp=2, device="cuda")
    assert generate(runners, prompts, MAX_NEW, chunk=64) == hf_greedy(family_dir, prompts, MAX_NEW)
