"""Prefix caching: greedy fp32 parity with transformers whether prompts hit the cache or
not, hit and computed-token counts, eviction, reset, and cache-aware placement across
virtual engines."""
from __future__ import annotations

import anyio
import pytest

from asyncpp import AsyncLLM
from helpers.models import TINY_LLAMA_BLOCK_BYTES
from helpers.parity import BLOCK, engine_tokens, greedy, hf_greedy, shared_prefix_prompts

MAX_TOKENS = 6


@pytest.mark.parametrize("model,pp,ves", [("llama", 1, 1), ("llama", 2, 1), ("llama", 2, 2),
                                          ("gpt2", 1, 1), ("gpt2", 2, 2)])
def test_parity_with_shared_prefixes(request, model, pp, ves):
    model_dir = request.getfixturevalue(f"{model}_dir")
    prompts = shared_prefix_prompts()
    tokens, stats = engine_tokens(model_dir, prompts, MAX_TOKENS, pipeline_parallel_size=pp, num_virtual_engines=ves,
                                  max_num_batched_tokens=48)
    assert tokens == hf_greedy(model_dir, prompts, MAX_TOKENS)
    assert stats.prefix_cache_hits > 0
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_cached > 0


def test_hits_are_counted_and_not_computed(llama_dir):
    prompts = shared_prefix_prompts(seed=1)
    on, with_cache = engine_tokens(llama_dir, prompts, MAX_TOKENS)
    off, without = engine_tokens(llama_dir, prompts, MAX_TOKENS, enable_prefix_caching=False)
    assert on == off
    assert without.prefix_cache_hits == 0
    # The whole prompt of 64 cached blocks computes its last block again (its last token needs logits).
    assert with_cache.prefix_cache_hits >= 3 * (4 * BLOCK) // 2
    assert with_cache.prefix_cache_queries == sum(map(len, prompts))
    assert without.pipeline.tokens - with_cache.pipeline.tokens == with_cache.prefix_cache_hits


def test_eviction_under_a_small_cache_keeps_outputs(llama_dir):
    prompts = [p for seed in range(3) for p in shared_prefix_prompts(seed)]
    tokens, stats = engine_tokens(llama_dir, prompts, 24, pipeline_parallel_size=2, num_virtual_engines=1,
                                  max_num_batched_tokens=32, max_model_len=160,
                                  kv_cache_memory=str(24 * TINY_LLAMA_BLOCK_BYTES))
    assert tokens == hf_greedy(llama_dir, prompts, 24)
    assert stats.prefix_cache_hits > 0
    assert stats.kv_blocks_used == 0


@pytest.mark.anyio
async def test_reset_frees_what_no_request_holds(llama_dir):
    prompt = shared_prefix_prompts()[5]
    async with AsyncLLM(str(llama_dir), skip_tokenizer_init=True, dtype="float32", device="cpu") as engine:
        async for _ in engine.generate(prompt, greedy(MAX_TOKENS)):
            pass
        stats = engine.stats()
        assert stats.kv_blocks_used == 0
        assert stats.kv_blocks_cached == (len(prompt) + MAX_TOKENS - 1) // BLOCK
        assert await engine.reset_prefix_cache() == stats.kv_blocks_cached
        assert engine.stats().kv_blocks_cached == 0
        async for _ in engine.generate(prompt, greedy(MAX_TOKENS)):
            pass
        assert engine.stats().prefix_cache_hits == 0  # nothing was left to hit
        async for again in engine.generate(prompt, greedy(MAX_TOKENS)):
            pass
        # Every full block but the one holding the last prompt token (it needs logits).
        assert again.num_cached_tokens == (len(prompt) - 1) // BLOCK * BLOCK == engine.stats().prefix_cache_hits


@pytest.mark.anyio
@pytest.mark.parametrize("cache_aware", [True, False])
async def test_same_prefix_lands_on_the_ve_caching_it(llama_dir, cache_aware):
    """A's prefix is cached in VE 0, which is busier than VE 1 when B arrives: least-loaded
    placement would send B to VE 1 and miss; cache-aware placement hits. (A light load that
    is kept in one VE, solo_stage_threads, would send B to VE 0 either way.)"""
    prompts = shared_prefix_prompts(seed=2)
    a, b, busy = prompts[0], prompts[5], [7] * 20
    async with AsyncLLM(str(llama_dir), pipeline_parallel_size=2, num_virtual_engines=2, skip_tokenizer_init=True,
                        dtype="float32", device="cpu", cache_aware_placement=cache_aware,
                        solo_stage_threads=False) as engine:
        async for _ in engine.generate(a, greedy(MAX_TOKENS)):  # to VE 0: both idle
            pass
        async with await engine.add_request(busy, greedy(400)) as long_one:  # to VE 0 too: both idle again
            await anext(long_one)
            hits_before = engine.stats().prefix_cache_hits
            with anyio.fail_after(30):
                async for _ in engine.generate(b, greedy(MAX_TOKENS)):
                    pass
        hits = engine.stats().prefix_cache_hits - hits_before
    assert hits == (4 * BLOCK if cache_aware else 0)
