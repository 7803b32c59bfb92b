"""Sliding-window models in stage processes, greedy fp32 parity with transformers:
P = 2 with V = 2 through the engine (prompts sharing prefixes longer than the window, so
prefix-cache hits start prompts past it; chunked prefill; a cache small enough to preempt),
and P = 2 x T = 2 (two gloo ranks, each sharding both stages)."""
from __future__ import annotations

import random

import pytest

from helpers.driver import engine_config, run_tensor_parallel
from helpers.models import VOCAB
from helpers.parity import engine_tokens, hf_greedy, mixed_prompts

FAMILIES = ["mistral_swa", "gemma3"]  # the Llama family's windows, and Gemma's local/global layers


def shared_prefix_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    base = tokens(80)  # 5 blocks, past every window
    shared = [base, base[:48] + tokens(30), base + tokens(37), base[:64] + tokens(3), base]
    return shared + mixed_prompts(3, 20, 140, seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_stages_two_virtual_engines(request, family):
    model_dir = request.getfixturevalue(f"{family}_dir")
    prompts = shared_prefix_prompts(seed=31)
    blocks = 40  # 20 per VE: the prompts' growth must preempt
    tokens, stats = engine_tokens(model_dir, prompts, 24, pipeline_parallel_size=2, num_virtual_engines=2,
                                  max_num_batched_tokens=48, max_model_len=200,
                                  kv_cache_memory=str(blocks * engine_config(model_dir).kv_bytes_per_block()))
    assert tokens == hf_greedy(model_dir, prompts, 24)
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0
    assert stats.kv_blocks_used == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", [*FAMILIES, "qwen2_swa", "gemma2"])
def test_two_stages_two_tensor_parallel_ranks(request, family, tmp_path):
    model_dir = request.getfixturevalue(f"{family}_dir")
    prompts = mixed_prompts(4, 1, 150, seed=32)
    expected = hf_greedy(model_dir, prompts, 12)
    results = run_tensor_parallel(model_dir, tmp_path, prompts, 12, tp=2, pp=2)
    assert [r["tokens"] for r in results] == [expected, expected]
