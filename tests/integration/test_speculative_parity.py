"""N-gram speculative decoding on real (tiny) models: greedy output token-identical to
transformers' and to asyncpp's own without speculation, for P = 1..3 and V = 1..2."""
from __future__ import annotations

import pytest

from asyncpp import LLM, SamplingParams
from helpers.models import TINY_LLAMA_BLOCK_BYTES
from helpers.parity import engine_tokens, hf_greedy, mixed_prompts, repeating_prompts

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
MAX_TOKENS = 24


@pytest.mark.parametrize("pp,ves", [(1, None), (2, 1), (2, 2), (3, None)])
def test_speculation_keeps_greedy_output_and_accepts_proposals(llama_v12_dir, pp, ves):
    prompts = repeating_prompts(pp)
    tokens, stats = engine_tokens(llama_v12_dir, prompts, MAX_TOKENS, pipeline_parallel_size=pp,
                                  num_virtual_engines=ves, max_num_batched_tokens=64, speculative_config=NGRAM)
    assert tokens == hf_greedy(llama_v12_dir, prompts, MAX_TOKENS)
    spec = stats.spec_decode
    assert spec is not None and spec.num_drafts > 0 and spec.num_accepted_tokens > 0
    assert stats.kv_blocks_used == 0


@pytest.mark.parametrize("pp", [1, 2])
def test_speculation_on_prompts_that_do_not_repeat(llama_dir, pp):
    prompts = mixed_prompts(5, hi=120, seed=20 + pp)
    tokens, stats = engine_tokens(llama_dir, prompts, MAX_TOKENS, pipeline_parallel_size=pp,
                                  max_num_batched_tokens=96, speculative_config=NGRAM)
    assert tokens == hf_greedy(llama_dir, prompts, MAX_TOKENS)
    assert stats.kv_blocks_used == 0


def test_speculation_under_preemption(llama_v12_dir):
    prompts = [p * 2 for p in repeating_prompts(7)] + repeating_prompts(8)
    tokens, stats = engine_tokens(llama_v12_dir, prompts, 32, pipeline_parallel_size=2, max_model_len=200,
                                  kv_cache_memory=str(30 * TINY_LLAMA_BLOCK_BYTES), speculative_config=NGRAM)
    assert stats.num_preemptions > 0 and stats.spec_decode.num_accepted_tokens > 0
    assert tokens == hf_greedy(llama_v12_dir, prompts, 32)
    assert stats.kv_blocks_used == 0


def _generate(model_dir, params: SamplingParams, speculative_config=None, **kwargs):
    prompts = repeating_prompts(3)
    with LLM(str(model_dir), skip_tokenizer_init=True, speculative_config=speculative_config, **kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [c for o in outs for c in o.outputs], llm.engine.stats()


def test_logprobs_of_each_emitted_token_match_those_without_speculation(llama_v12_dir):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    plain, _ = _generate(llama_v12_dir, params)
    spec, stats = _generate(llama_v12_dir, params, NGRAM)
    assert stats.spec_decode.num_accepted_tokens > 0
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids and len(b.logprobs) == len(b.token_ids)
        for pa, pb in zip(a.logprobs, b.logprobs):
            assert pa.keys() == pb.keys()
            assert all(pa[t].logprob == pytest.approx(pb[t].logprob, abs=1e-4) for t in pa)
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)


@pytest.mark.parametrize("pp", [1, 2])
def test_seeded_sampling_draws_the_same_tokens_with_speculation(llama_v12_dir, pp):
    """Verification samples each position with the noise the plain sampler would use there, so a
    seeded request's tokens do not depend on speculation (n > 1: each sequence its own seed)."""
    params = SamplingParams(temperature=0.7, top_k=8, max_tokens=MAX_TOKENS, ignore_eos=True, seed=1234, n=2,
                            repetition_penalty=1.1)
    plain, _ = _generate(llama_v12_dir, params, pipeline_parallel_size=pp)
    spec, stats = _generate(llama_v12_dir, params, NGRAM | {"disable_by_batch_size": 64}, pipeline_parallel_size=pp)
    assert stats.spec_decode.num_accepted_tokens > 0  # 10 sequences: past the CPU default of 8
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]


@pytest.mark.parametrize("family,pp", [("mistral_swa", 2), ("gemma3", 1), ("deepseek_v3", 1)])
def test_speculation_with_sliding_windows_and_latent_attention(request, family, pp):
    """Each verified position attends as a decode of its own: through each window's view and
    through the latent cache too."""
    model_dir = request.getfixturevalue(f"{family}_dir")
    prompts = [p + p[:30] for p in mixed_prompts(3, lo=20, hi=60, seed=5)]  # past the 32-40 token windows
    tokens, stats = engine_tokens(model_dir, prompts, MAX_TOKENS, pipeline_parallel_size=pp,
                                  speculative_config=NGRAM)
    assert tokens == hf_greedy(model_dir, prompts, MAX_TOKENS)
    assert stats.spec_decode.num_drafts > 0 and stats.kv_blocks_used == 0
