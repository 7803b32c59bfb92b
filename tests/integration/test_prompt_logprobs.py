"""`prompt_logprobs` (vLLM's field): each prompt token's logprob, rank and the most likely
tokens, as transformers' forward pass gives them, through chunked prefill, preemption and a
prefix cache that holds the prompt (it is computed again: a cached block has no logits)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from asyncpp import LLM, SamplingParams
from helpers.models import TINY_LLAMA_BLOCK_BYTES
from helpers.parity import hf_greedy, mixed_prompts

TOP = 3
MAX_TOKENS = 24


def hf_prompt_logprobs(model, prompt: list[int]) -> list[dict[int, tuple[float, int]]]:
    """Per position from 1 on: token -> (logprob, rank) for the prompt's token and the TOP best."""
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
    out = []
    for row, token in zip(logprobs, prompt[1:]):
        entry = {token: (row[token].item(), int((row > row[token]).sum()) + 1)}
        values, ids = row.topk(TOP)
        for rank, (tok, value) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
            entry.setdefault(tok, (value, rank))
        out.append(entry)
    return out


def test_prompt_logprobs_match_transformers_through_chunks_preemption_and_the_prefix_cache(llama_dir):
    prompts = mixed_prompts(6, lo=2, hi=120, seed=5)
    prompts.append(prompts[1])  # the same prompt again: its blocks are in the prefix cache by then
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=TOP)
    outs, stats = _run(llama_dir, prompts, params)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0  # (re-admitted once their prompts ran)
    assert [o.num_cached_tokens for o in outs] == [0] * len(prompts)  # the repeat computed its prompt
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(llama_dir, prompts, MAX_TOKENS)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        expected = hf_prompt_logprobs(model, prompt)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for got, want in zip(out.prompt_logprobs[1:], expected):
            assert got.keys() == want.keys()
            for token, (value, rank) in want.items():
                assert abs(got[token].logprob - value) < 1e-4 and got[token].rank == rank


def _run(model_dir, prompts, params):
    with LLM(str(model_dir), skip_tokenizer_init=True, pipeline_parallel_size=2, max_model_len=160,
             max_num_batched_tokens=32, kv_cache_memory=str(32 * TINY_LLAMA_BLOCK_BYTES)) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return outs, llm.engine.stats()

