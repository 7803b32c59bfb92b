"""The newer families (Qwen3, Qwen3-MoE, Mixtral, Phi-3) through the whole engine in stage processes: greedy fp32
parity with transformers at P=2 with two virtual engines on prompts that share prefixes
(prefix-cache hits) and at P=2 x T=2 across a split layer, each rank loading only its slices.
The in-process layouts: unit/test_family_runners.py."""
from __future__ import annotations

import pytest

from helpers.parity import engine_tokens, hf_greedy, mixed_prompts, shared_prefix_prompts, tp_run

MAX_TOKENS = 8
FAMILIES = ["qwen3", "qwen3_moe", "mixtral", "phi3"]


@pytest.fixture(params=FAMILIES)
def family_dir(request):
    return request.getfixturevalue(f"{request.param}_dir")


def test_two_stages_two_virtual_engines_with_shared_prefixes(family_dir):
    prompts = shared_prefix_prompts(seed=5) + mixed_prompts(4, 1, 200, seed=5)
    tokens, stats = engine_tokens(family_dir, prompts, MAX_TOKENS, pipeline_parallel_size=2, num_virtual_engines=2,
                                  max_num_batched_tokens=64)
    assert tokens == hf_greedy(family_dir, prompts, MAX_TOKENS)
    assert stats.prefix_cache_hits > 0
    assert len(stats.pipeline.busy_fractions) == 2


@pytest.mark.slow
def test_two_stages_by_two_ranks_across_a_split_layer(family_dir):
    tp_run(family_dir, pp=2, tp=2, seed=26, partition="1.5,2.5")
