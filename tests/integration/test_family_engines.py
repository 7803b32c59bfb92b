"""The newer families (Qwen3, Qwen3-MoE, Mixtral, Phi-3) through the whole engine in stage
processes, one run each: P=2 x T=2 with two virtual engines, stages split inside layer 1 (its
attention sharded on stage 0's ranks, its MLP or MoE block on stage 1's), prompts of mixed
lengths and prompts sharing prefixes (prefix-cache hits); greedy fp32 parity with
transformers, each rank holding only its slices. The in-process layouts (P=1, P=2 with V=2,
P=3 split): unit/test_family_runners.py."""
from __future__ import annotations

import pytest

from helpers.parity import mixed_prompts, shared_prefix_prompts, tp_run

FAMILIES = ["qwen3", "qwen3_moe", "mixtral", "phi3", "deepseek_v3"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_stages_by_two_ranks_two_virtual_engines_shared_prefixes(request, family):
    model_dir = request.getfixturevalue(f"{family}_dir")
    prompts = shared_prefix_prompts(seed=5) + mixed_prompts(4, 1, 200, seed=5)
    stats = tp_run(model_dir, pp=2, tp=2, seed=5, partition="1.5,2.5", prompts=prompts)
    assert stats.prefix_cache_hits > 0
    assert len(stats.pipeline.busy_fractions) == 2 and stats.layer_partition == [1.5, 2.5]
