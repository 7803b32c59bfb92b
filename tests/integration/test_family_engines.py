"""The newer families (Qwen3, Qwen3-MoE, Mixtral, Phi-3, DeepSeek-V3, gpt-oss) through the whole engine in
stage processes, one run each: P=2 x T=2 with two virtual engines, stages split inside layer 1 (its
attention sharded on stage 0's ranks, its MLP or MoE block on stage 1's), prompts of mixed
lengths and prompts sharing prefixes (prefix-cache hits); greedy fp32 parity with
transformers, each rank holding only its slices. The in-process layouts (P=1, P=2 with V=2,
P=3 split): unit/test_family_runners.py."""
from __future__ import annotations

import pytest

from helpers.parity import engine_tokens, hf_greedy, mixed_prompts, shared_prefix_prompts, tp_run

FAMILIES = ["qwen3", "qwen3_moe", "mixtral", "phi3", "deepseek_v3", "gpt_oss"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_stages_by_two_ranks_two_virtual_engines_shared_prefixes(request, family):
    model_dir = request.getfixturevalue(f"{family}_dir")
    prompts = shared_prefix_prompts(seed=5) + mixed_prompts(4, 1, 200, seed=5)
    stats = tp_run(model_dir, pp=2, tp=2, seed=5, partition="1.5,2.5", prompts=prompts)
    assert stats.prefix_cache_hits > 0
    assert len(stats.pipeline.busy_fractions) == 2 and stats.layer_partition == [1.5, 2.5]


def test_deepseek_latent_cache_budget_and_preemption(deepseek_v3_dir):
    """MLA's blocks hold one latent entry per token and layer (4 x 16 x 48 fp32 here): a budget of
    14 of them gives 14 blocks, which the prompts outgrow, so sequences are preempted and
    recomputed; tokens as transformers' (the prompts of the run above: its oracle is cached)."""
    block = 4 * 16 * (32 + 16) * 4
    prompts = shared_prefix_prompts(seed=5) + mixed_prompts(4, 1, 200, seed=5)
    tokens, stats = engine_tokens(deepseek_v3_dir, prompts, 8, max_model_len=216, kv_cache_memory=str(14 * block))
    assert stats.kv_blocks_total == 14 and stats.num_preemptions > 0
    assert tokens == hf_greedy(deepseek_v3_dir, prompts, 8)
