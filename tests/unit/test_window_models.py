"""Sliding-window models through ModelRunners in this process, against transformers'
generate() (greedy fp32, exact): Mistral (every layer windowed, 40 tokens), Qwen2 (its upper
layers windowed), Gemma 3 (local and global layers, 32 tokens) and Gemma 2 (soft-capped).
Prompts run past the windows, generation crosses them, prompt chunks start past them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.driver import generate, runners_for
from helpers.models import GEMMA_ATTENTION_HALF, checkpoint_share, make_gemma3
from helpers.parity import hf_greedy, mixed_prompts

MAX_NEW = 12
FAMILIES = ["mistral_swa", "qwen2_swa", "gemma3", "gemma2"]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Long prompts (to 300 tokens) and ones of 25-38 tokens whose generation crosses the windows."""
    short = mixed_prompts(3, 25, 38, seed=5)
    return mixed_prompts(5, 1, 300, seed=4) + short


@pytest.fixture(params=FAMILIES)
def window_model(request):
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.mark.parametrize("chunk", [100, 24])  # prompt chunks longer than the windows, and shorter
def test_single_stage_matches_transformers(window_model, prompts, chunk):
    torch.set_num_threads(1)
    expected = hf_greedy(window_model, prompts, MAX_NEW)
    assert generate(runners_for(window_model), prompts, MAX_NEW, chunk=chunk, admit_per_step=3) == expected


@pytest.mark.parametrize("family", ["mistral_swa", "gemma2"])
def test_torch_decode_path_matches_transformers(request, family, prompts):
    """Where the compiled kernel runs the decodes (CPU), the torch path (GPU, no compiler) too."""
    torch.set_num_threads(1)
    model_dir = request.getfixturevalue(f"{family}_dir")
    runners = runners_for(model_dir)
    runners[0].layout = dataclasses.replace(runners[0].layout, decode_kernel=False)
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    assert generate(runners, prompts, MAX_NEW, chunk=100, admit_per_step=3) == expected


def test_two_stages_second_virtual_engine(window_model, prompts):
    torch.set_num_threads(1)
    expected = hf_greedy(window_model, prompts, MAX_NEW)
    runners = runners_for(window_model, pp=2, num_ves=2)
    assert generate(runners, prompts, MAX_NEW, chunk=48, ve_id=1, use_sampler=True) == expected


@pytest.mark.parametrize("family,partition", [("mistral_swa", "1.5,1,1.5"), ("qwen2_swa", "1,1.5,1.5"),
                                              ("gemma3", "1.5,2,1.5"), ("gemma2", "1.5,1,1.5")])
def test_three_stages_split_inside_layers(request, family, partition, prompts):
    """x.5: a layer's attention (with Gemma's post-attention norm) on one stage, its MLP on the next."""
    torch.set_num_threads(1)
    model_dir = request.getfixturevalue(f"{family}_dir")
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    runners = runners_for(model_dir, pp=3, pp_layer_partition=partition)
    assert generate(runners, prompts, MAX_NEW, chunk=40, admit_per_step=3) == expected


def test_gemma3_weights_per_stage_and_tied_head(tmp_path, prompts):
    """Each stage loads its share (a split layer's post-attention norm with its attention);
    Gemma 3's tied head (its default) on the last stage reads the embedding."""
    torch.set_num_threads(1)
    model_dir = make_gemma3(tmp_path, tie=True)
    runners = runners_for(model_dir, pp=2, pp_layer_partition="2.5,2.5")
    assert [r.param_bytes() for r in runners] == [checkpoint_share(model_dir, r.stage, True, GEMMA_ATTENTION_HALF)
                                                  for r in runners]
    assert generate(runners, prompts[:4], 6, chunk=64) == hf_greedy(model_dir, prompts[:4], 6)

