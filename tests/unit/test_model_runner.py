"""ModelRunner against transformers: greedy fp32 token ids must match generate() exactly."""
from __future__ import annotations

import pytest
import torch

from asyncpp.worker.model_runner import ModelRunner
from helpers.driver import engine_config, generate, runners_for
from helpers.models import checkpoint_share
from helpers.parity import hf_greedy, mixed_prompts

MAX_NEW = 12
NUM_BLOCKS = 400


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return mixed_prompts(8, 1, 300)


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def any_model_dir(request, llama_dir, qwen2_dir, gpt2_dir):
    return {"llama": llama_dir, "qwen2": qwen2_dir, "gpt2": gpt2_dir}[request.param]


def test_single_stage_matches_transformers(any_model_dir, prompts):
    torch.set_num_threads(1)
    expected = hf_greedy(any_model_dir, prompts, MAX_NEW)
    got = generate(runners_for(any_model_dir), prompts, MAX_NEW, chunk=64)
    assert got == expected


def test_two_stages_match_transformers(any_model_dir, prompts):
    torch.set_num_threads(1)
    expected = hf_greedy(any_model_dir, prompts, MAX_NEW)
    got = generate(runners_for(any_model_dir, pp=2), prompts, MAX_NEW, chunk=48, admit_per_step=3)
    assert got == expected


def test_uneven_stages_second_virtual_engine_and_sampler(llama_dir, prompts):
    torch.set_num_threads(1)
    expected = hf_greedy(llama_dir, prompts, MAX_NEW)
    runners = runners_for(llama_dir, pp=3, num_ves=2, pp_layer_partition="1,2,1")
    assert [r.stage.num_layers for r in runners] == [1, 2, 1]
    got = generate(runners, prompts, MAX_NEW, chunk=100, ve_id=1, use_sampler=True)
    assert got == expected


def test_stages_split_inside_layers(any_model_dir, prompts):
    """x.5 partitions: a layer's attention on one stage and its MLP on the next, and a
    middle stage that starts and ends halfway through layers."""
    torch.set_num_threads(1)
    expected = hf_greedy(any_model_dir, prompts, MAX_NEW)
    runners = runners_for(any_model_dir, pp=3, pp_layer_partition="1.5,1,1.5")
    assert [(r.stage.layer_start, r.stage.layer_end) for r in runners] == [(0, 2), (1, 3), (2, 4)]
    assert [r.stage.kv_layers for r in runners] == [2, 1, 1]
    assert [len(caches) for r in runners for caches in r.kv_caches[:1]] == [2, 1, 1]
    got = generate(runners, prompts, MAX_NEW, chunk=48, admit_per_step=3)
    assert got == expected


def test_unchunked_prompts_and_pure_decode_batches(llama_dir, prompts):
    torch.set_num_threads(1)
    expected = hf_greedy(llama_dir, prompts, MAX_NEW)
    got = generate(runners_for(llama_dir), prompts, MAX_NEW, chunk=1000, admit_per_step=len(prompts))
    assert got == expected


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_param_bytes_per_stage(model, llama_dir, qwen2_dir):
    model_dir = {"llama": llama_dir, "qwen2": qwen2_dir}[model]
    tied = model == "qwen2"  # the last stage loads the embedding for its head
    for partition in [None, "2.5,1.5"]:
        runners = runners_for(model_dir, pp=2, pp_layer_partition=partition)
        assert [r.param_bytes() for r in runners] == [checkpoint_share(model_dir, r.stage, tied) for r in runners]
    single = runners_for(model_dir)[0]
    assert single.param_bytes() == checkpoint_share(model_dir, single.stage, tied)  # tied: held once


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(2)
    cfg = MistralConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        sliding_window=4096, rope_theta=50000.0, initializer_range=0.2,
                        bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


def test_mistral_matches_transformers(mistral_dir, prompts):
    torch.set_num_threads(1)
    expected = hf_greedy(mistral_dir, prompts, MAX_NEW)
    assert generate(runners_for(mistral_dir, pp=2), prompts, MAX_NEW, chunk=80) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", ["llama", "mistral_swa", "gemma3"])
def test_cuda_matches_transformers(request, model, prompts):
    model_dir = request.getfixturevalue(f"{model}_dir")
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    config = engine_config(model_dir, device="cuda")
    runner = ModelRunner(config, config.stages[0])
    assert runner.num_available_blocks() > NUM_BLOCKS
    runner.init_kv_cache(1, NUM_BLOCKS)
    assert generate([runner], prompts, MAX_NEW, chunk=64) == expected


def test_plain_f_linear_path_matches_transformers(llama_dir, prompts):
    """CPU fp32 weights are prepacked for oneDNN by default; the F.linear path must agree too."""
    torch.set_num_threads(1)
    runners = runners_for(llama_dir, onednn=False)
    assert not runners[0].model.layers[0].mlp.down_proj.weight.is_mkldnn
    assert generate(runners, prompts, MAX_NEW, chunk=64) == hf_greedy(llama_dir, prompts, MAX_NEW)


def test_cpu_weights_are_prepacked(qwen2_dir):
    model = runners_for(qwen2_dir)[0].model
    assert model.layers[0].self_attn.qkv_proj.weight.is_mkldnn
    assert not model.embed_tokens.weight.is_mkldnn  # tied: the embedding stays dense ...
    assert model.lm_head.packed is not None and model.lm_head.packed.is_mkldnn  # ... the head gets a packed copy


@pytest.mark.parametrize("model", ["gpt2", "mistral_swa"])  # mistral_swa: the reads of 40-token windows
def test_unwritten_cache_slots_are_never_read(request, model, prompts):
    """The cache is allocated uninitialised: NaN everywhere must not reach any output."""
    torch.set_num_threads(1)
    model_dir = request.getfixturevalue(f"{model}_dir")
    runners = runners_for(model_dir)
    for keys, values in runners[0].kv_caches[0]:
        keys.fill_(float("nan"))
        values.fill_(float("nan"))
    assert generate(runners, prompts, MAX_NEW, chunk=50) == hf_greedy(model_dir, prompts, MAX_NEW)
