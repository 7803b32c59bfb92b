"""Greedy fp32 parity with transformers for P > 1 (mp backend: one process per stage)."""
import pytest

from helpers.models import TINY_LLAMA_BLOCK_BYTES
from helpers.parity import engine_tokens, hf_greedy, mixed_prompts

MAX_TOKENS = 10


@pytest.mark.parametrize("arch,pp,partition,ves", [
    ("llama", 2, None, 2),     # the measured split (auto), V = P
    ("llama", 2, None, 1),     # V = 1
    ("llama", 3, "cost", 3),   # by estimated cost: 1,1.5,1.5
    ("llama", 4, None, 4),
    ("gpt2", 2, None, 2),
    ("gpt2", 3, "2,1,1", 2),   # explicit partition, V < P
    ("llama", 2, "2.5,1.5", 1),  # a layer split after its attention
    ("gpt2", 3, "1.5,1,1.5", 3),  # the middle stage starts and ends mid-layer
])
def test_pipeline_matches_hf(llama_dir, gpt2_dir, arch, pp, partition, ves):
    model_dir = llama_dir if arch == "llama" else gpt2_dir
    prompts = mixed_prompts(6, seed=10 + pp)
    tokens, stats = engine_tokens(model_dir, prompts, MAX_TOKENS, pipeline_parallel_size=pp,
                                  pp_layer_partition=partition, num_virtual_engines=ves,
                                  max_num_batched_tokens=96)
    assert tokens == hf_greedy(model_dir, prompts, MAX_TOKENS)
    assert stats.kv_blocks_used == 0
    assert len(stats.pipeline.busy_fractions) == pp


def test_pipeline_preemption_matches_hf(llama_dir):
    prompts = mixed_prompts(8, hi=120, seed=3)
    tokens, stats = engine_tokens(llama_dir, prompts, 32, pipeline_parallel_size=2,
                                  max_model_len=160,
                                  kv_cache_memory=str(32 * TINY_LLAMA_BLOCK_BYTES))
    assert stats.num_preemptions > 0
    assert tokens == hf_greedy(llama_dir, prompts, 32)
