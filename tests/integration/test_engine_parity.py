"""Greedy fp32 parity with transformers generate(), one process (uni backend)."""

from helpers.models import TINY_LLAMA_BLOCK_BYTES
from helpers.parity import engine_tokens, hf_greedy, mixed_prompts

MAX_TOKENS = 12


def test_mixed_batch_matches_hf(model_dir):
    prompts = mixed_prompts(8)
    tokens, stats = engine_tokens(model_dir, prompts, MAX_TOKENS)
    assert tokens == hf_greedy(model_dir, prompts, MAX_TOKENS)
    assert stats.kv_blocks_used == 0


def test_chunked_prefill_matches_hf(llama_dir):
    prompts = mixed_prompts(6, seed=1)
    tokens, _ = engine_tokens(llama_dir, prompts, MAX_TOKENS, max_num_batched_tokens=48)
    assert tokens == hf_greedy(llama_dir, prompts, MAX_TOKENS)


def test_chunked_prefill_off_matches_hf(gpt2_dir):
    prompts = mixed_prompts(6, seed=2)
    tokens, _ = engine_tokens(gpt2_dir, prompts, MAX_TOKENS, enable_chunked_prefill=False,
                              max_model_len=512, max_num_batched_tokens=512)
    assert tokens == hf_greedy(gpt2_dir, prompts, MAX_TOKENS)


def test_forced_preemption_keeps_tokens(llama_dir):
    prompts = mixed_prompts(8, hi=120, seed=3)
    blocks = 16  # prompts fill the cache; their growth must preempt
    tokens, stats = engine_tokens(llama_dir, prompts, 32, max_model_len=160,
                                  kv_cache_memory=str(blocks * TINY_LLAMA_BLOCK_BYTES))
    assert stats.num_preemptions > 0
    assert tokens == hf_greedy(llama_dir, prompts, 32)
    assert stats.kv_blocks_used == 0


def test_qkv_bias_tied_head_matches_hf(qwen2_dir):
    prompts = mixed_prompts(4, hi=100, seed=4)
    tokens, _ = engine_tokens(qwen2_dir, prompts, MAX_TOKENS)
    assert tokens == hf_greedy(qwen2_dir, prompts, MAX_TOKENS)
