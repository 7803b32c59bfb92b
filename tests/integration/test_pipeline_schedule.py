"""The pipeline schedule: several microbatches of one virtual engine in flight (prompt
chunks of one sequence, other sequences) and latency-bounded microbatches, with greedy fp32
parity with transformers throughout. (The cost-balanced default partition:
unit/test_config.py.)"""
from __future__ import annotations

import anyio
import pytest

from asyncpp import AsyncLLM
from helpers.models import TINY_LLAMA_BLOCK_BYTES
from helpers.parity import engine_tokens, greedy, hf_greedy, mixed_prompts

MAX_TOKENS = 8


@pytest.mark.parametrize("pp,ves,budget", [(2, 1, 16), (2, 2, 64), (3, 1, 32), (3, 3, 16), (4, 1, 48), (4, 4, 32)])
def test_parity_with_several_microbatches_in_flight(llama_dir, pp, ves, budget):
    """Stages on their own cores, so a light load spreads over the VEs (test_solo_pipeline.py
    keeps it in one)."""
    prompts = mixed_prompts(6, lo=1, hi=200, seed=40 + pp)
    tokens, stats = engine_tokens(llama_dir, prompts, MAX_TOKENS, pipeline_parallel_size=pp,
                                  num_virtual_engines=ves, max_num_batched_tokens=budget, solo_stage_threads=False)
    assert tokens == hf_greedy(llama_dir, prompts, MAX_TOKENS)
    assert stats.kv_blocks_used == 0
    assert stats.pipeline.in_flight_max > ves  # some VE had more than one microbatch in flight


def test_one_long_prompt_is_pipelined_across_stages(llama_dir):
    prompt = mixed_prompts(2, lo=400, hi=400, seed=5)[:1]
    tokens, stats = engine_tokens(llama_dir, prompt, 1, pipeline_parallel_size=2, max_num_batched_tokens=32)
    assert tokens == hf_greedy(llama_dir, prompt, 1)
    assert stats.pipeline.in_flight_max >= 2  # its chunks occupied both stages at once
    assert stats.pipeline.microbatches == 400 // 32 + 1


def test_preemption_with_chunks_in_flight(llama_dir):
    prompts = mixed_prompts(8, hi=120, seed=3)
    tokens, stats = engine_tokens(llama_dir, prompts, 24, pipeline_parallel_size=2, num_virtual_engines=1,
                                  max_num_batched_tokens=32, max_model_len=160,
                                  kv_cache_memory=str(24 * TINY_LLAMA_BLOCK_BYTES))
    assert stats.num_preemptions > 0
    assert tokens == hf_greedy(llama_dir, prompts, 24)
    assert stats.kv_blocks_used == 0


@pytest.mark.anyio
async def test_aborts_while_chunks_are_in_flight(llama_dir):
    prompts = mixed_prompts(6, lo=400, hi=600, seed=8)
    async with AsyncLLM(str(llama_dir), pipeline_parallel_size=2, num_virtual_engines=1, skip_tokenizer_init=True,
                        max_num_batched_tokens=16, dtype="float32", device="cpu") as engine:
        streams = [await engine.add_request(p, greedy(MAX_TOKENS), request_id=str(i)) for i, p in enumerate(prompts)]
        with anyio.fail_after(10):
            while engine.stats().pipeline.in_flight_max < 2:  # chunks are in the pipeline now
                await anyio.sleep(0.001)
        for i in (0, 3, 5):
            assert await engine.abort(str(i))
        outputs = {}
        for i in (1, 2, 4):
            async for out in streams[i]:
                outputs[i] = out.outputs[0].token_ids
        aborted = [await anext(streams[i]) for i in (0, 3, 5)]
        with anyio.fail_after(10):
            while engine.stats().kv_blocks_used:
                await anyio.sleep(0.05)
        assert engine.stats().pipeline.in_flight_max >= 2
    assert all(out.outputs[0].finish_reason == "abort" for out in aborted)
    assert [outputs[i] for i in (1, 2, 4)] == hf_greedy(llama_dir, [prompts[i] for i in (1, 2, 4)], MAX_TOKENS)


@pytest.mark.parametrize("pp", [2, 3])
def test_a_light_load_runs_in_one_microbatch_on_every_core_with_parity(llama_dir, pp, monkeypatch):
    """solo_stage_threads (the default on CPU): the six requests stay in one VE, their decodes go in one
    microbatch per step, each stage runs it on the cores of all (2 here): fewer microbatches than with
    the stages on their own cores, and the same tokens as transformers."""
    monkeypatch.setattr("asyncpp.engine_args.available_cores", lambda: 2)
    prompts = mixed_prompts(6, lo=1, hi=120, seed=60 + pp)
    solo, solo_stats = engine_tokens(llama_dir, prompts, MAX_TOKENS, pipeline_parallel_size=pp, num_threads=1)
    shared, shared_stats = engine_tokens(llama_dir, prompts, MAX_TOKENS, pipeline_parallel_size=pp, num_threads=1,
                                         solo_stage_threads=False)
    assert solo == shared == hf_greedy(llama_dir, prompts, MAX_TOKENS)
    assert solo_stats.kv_blocks_used == shared_stats.kv_blocks_used == 0
    assert solo_stats.pipeline.microbatches < shared_stats.pipeline.microbatches
