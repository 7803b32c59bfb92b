"""Draft-model speculation on real (tiny) models: the draft is the target's first layer (or the
target itself), run by asyncpp's own model code in the engine process. Greedy output is
token-identical to transformers' for P = 1..3 and V = 1..2, and no KV block of the target or of
the draft outlives its sequence (finished, aborted, preempted)."""
from __future__ import annotations

import pytest

from asyncpp import LLM, AsyncLLM, SamplingParams
from helpers.fake_engine import abort_each_after_three
from helpers.models import TINY_LLAMA_BLOCK_BYTES
from helpers.parity import engine_tokens, hf_greedy, mixed_prompts, repeating_prompts

MAX_TOKENS = 24


def draft(model_dir, k: int = 3) -> dict:
    return {"model": str(model_dir), "num_speculative_tokens": k}


def assert_no_blocks_held(stats) -> None:
    assert stats.kv_blocks_used == 0 and stats.draft_kv_blocks_used == 0


@pytest.mark.parametrize("pp,ves", [(1, None), (2, 1), (2, 2), (3, None)])
def test_greedy_output_matches_transformers_with_a_truncated_draft(llama_v12_dir, llama_v12_draft_dir, pp, ves):
    prompts = repeating_prompts(pp)
    tokens, stats = engine_tokens(llama_v12_dir, prompts, MAX_TOKENS, pipeline_parallel_size=pp,
                                  num_virtual_engines=ves, max_num_batched_tokens=64,
                                  speculative_config=draft(llama_v12_draft_dir))
    assert tokens == hf_greedy(llama_v12_dir, prompts, MAX_TOKENS)
    spec = stats.spec_decode
    assert spec is not None and spec.num_drafts > 0 and spec.draft_seconds > 0
    assert_no_blocks_held(stats)


@pytest.mark.parametrize("pp", [1, 2])
def test_the_target_as_its_own_draft_accepts_every_proposal(llama_dir, pp):
    prompts = mixed_prompts(5, hi=120, seed=30 + pp)
    tokens, stats = engine_tokens(llama_dir, prompts, MAX_TOKENS, pipeline_parallel_size=pp,
                                  max_num_batched_tokens=96, speculative_config=draft(llama_dir, k=4))
    assert tokens == hf_greedy(llama_dir, prompts, MAX_TOKENS)
    spec = stats.spec_decode
    assert spec.num_accepted_tokens > 0 and spec.acceptance_rate > 0.9
    assert_no_blocks_held(stats)


def test_seeded_sampling_draws_the_same_tokens_with_a_draft(llama_v12_dir, llama_v12_draft_dir):
    """Verification samples each position with the noise the plain sampler would use there: a
    greedy draft's proposals change how many tokens a step yields, not which."""
    params = SamplingParams(temperature=0.8, top_k=6, max_tokens=MAX_TOKENS, ignore_eos=True, seed=99, n=2)
    outputs = []
    for config in (None, draft(llama_v12_draft_dir)):
        with LLM(str(llama_v12_dir), skip_tokenizer_init=True, speculative_config=config) as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in repeating_prompts(5)[:3]], params)
            outputs.append([c.token_ids for o in outs for c in o.outputs])
            stats = llm.engine.stats()
    assert stats.spec_decode.num_drafts > 0
    assert outputs[0] == outputs[1]


def test_preemption_frees_the_drafts_blocks_and_keeps_output_right(llama_v12_dir, llama_v12_draft_dir):
    prompts = [p * 2 for p in repeating_prompts(7)] + repeating_prompts(8)
    tokens, stats = engine_tokens(llama_v12_dir, prompts, 32, pipeline_parallel_size=2, max_model_len=200,
                                  kv_cache_memory=str(30 * TINY_LLAMA_BLOCK_BYTES),
                                  speculative_config=draft(llama_v12_draft_dir))
    assert stats.num_preemptions > 0 and stats.spec_decode.num_drafts > 0
    assert tokens == hf_greedy(llama_v12_dir, prompts, 32)
    assert_no_blocks_held(stats)


@pytest.mark.anyio
@pytest.mark.parametrize("pp", [1, 2])
async def test_aborts_with_proposals_in_flight_free_the_targets_and_the_drafts_blocks(llama_v12_dir, pp):
    async with AsyncLLM(str(llama_v12_dir), skip_tokenizer_init=True, pipeline_parallel_size=pp,
                        speculative_config=draft(llama_v12_dir)) as llm:
        finals = await abort_each_after_three(llm, [p + [3 + i] for i, p in enumerate(repeating_prompts(4)[:4])],
                                              SamplingParams(temperature=0, ignore_eos=True))
        stats = llm.stats()
    assert {out.outputs[0].finish_reason for out in finals} == {"abort"}
    assert stats.spec_decode.num_drafts > 0
    assert_no_blocks_held(stats)
