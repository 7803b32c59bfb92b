"""N-gram speculation end to end without a model: the fake runner (helpers/fake_runner.py)
answers last token + 1, so a proposal that counts up is accepted and any other rejected, and it
checks every KV read: a rolled-back block read as if it held accepted tokens fails the request.
Under the uni backend (P = 1) and the mp backend (P = 2, two VEs)."""
from __future__ import annotations

import random

import pytest

from helpers.fake_engine import abort_each_after_three, all_finals, assert_idle, counting, fake_engine, stream
from helpers.fake_runner import next_tokens
from helpers.models import TINY_LLAMA_BLOCK_BYTES, VOCAB

pytestmark = pytest.mark.anyio

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
# Counts up from 10 and starts again: after "10 11" the lookup proposes 12, 13, ... (all accepted).
COPY = list(range(10, 40)) + [10, 11]
# Its 20s are followed by 7s: after "20", the lookup proposes 7 (rejected: the runner says 21).
DECOY = [20, 7, 8, 20, 7, 8, 19]







async def test_accepted_proposals_give_the_same_tokens_in_fewer_steps(llama_dir, layout):
    async with fake_engine(llama_dir, **layout) as plain:
        without = await stream(plain, COPY, counting(40))
    async with fake_engine(llama_dir, speculative_config=NGRAM, **layout) as llm:
        outs = await stream(llm, COPY, counting(40))
        stats = llm.stats()
        assert_idle(llm)
    assert outs[-1].outputs[0].token_ids == without[-1].outputs[0].token_ids == next_tokens(11, 40, VOCAB)
    spec = stats.spec_decode
    assert spec is not None and spec.num_accepted_tokens > 0 and spec.accepted_per_position[3] > 0
    assert len(outs) < len(without)  # several tokens a step
    assert outs[-1].outputs[0].finish_reason == "length"


async def test_rejected_proposals_roll_back(llama_dir, layout):
    async with fake_engine(llama_dir, speculative_config=NGRAM, **layout) as llm:
        final = (await stream(llm, DECOY, counting(12)))[-1].outputs[0]
        stats = llm.stats()
        assert_idle(llm)
    assert final.token_ids == next_tokens(19, 12, VOCAB)
    spec = stats.spec_decode
    assert spec is not None and spec.num_draft_tokens > spec.num_accepted_tokens


async def test_stops_inside_an_accepted_proposal_truncate_it(llama_dir):
    async with fake_engine(llama_dir, speculative_config=NGRAM) as llm:
        stopped = (await stream(llm, COPY, counting(40, stop_token_ids=[17])))[-1].outputs[0]
        capped = (await stream(llm, COPY, counting(7)))[-1].outputs[0]
        # "998 999" is followed by 0, 1, 2, 5: 0, 1 and EOS (2) are accepted, and EOS ends it.
        eos = (await stream(llm, [998, 999, 0, 1, 2, 5, 998, 999], counting(10)))[-1].outputs[0]
        assert_idle(llm)
    assert (stopped.token_ids, stopped.finish_reason, stopped.stop_reason) == ([12, 13, 14, 15, 16, 17], "stop", 17)
    assert (capped.token_ids, capped.finish_reason) == (next_tokens(11, 7, VOCAB), "length")
    assert (eos.token_ids, eos.finish_reason) == ([0, 1, 2], "stop")


async def test_n_sequences_each_speculate(llama_dir, layout):
    async with fake_engine(llama_dir, speculative_config=NGRAM, **layout) as llm:
        final = (await stream(llm, COPY, counting(20, n=3)))[-1]
        assert_idle(llm)
    assert [c.token_ids for c in final.outputs] == [next_tokens(11, 20, VOCAB)] * 3


async def test_aborts_with_proposals_in_flight_free_every_block(llama_dir, layout):
    async with fake_engine(llama_dir, speculative_config=NGRAM, **layout) as llm:
        finals = await abort_each_after_three(llm, [COPY + [12 + i] for i in range(4)])
        assert_idle(llm)
        assert llm.stats().spec_decode.num_drafts > 0
    assert {out.outputs[0].finish_reason for out in finals} == {"abort"}


async def test_preemption_with_proposals_keeps_outputs_right(llama_dir, layout):
    rng = random.Random(0)
    prompts = []
    for _ in range(8):
        start = rng.randrange(3, 700)
        run = list(range(start, start + rng.randint(8, 30)))
        prompts.append(run + [rng.randrange(3, 800) for _ in range(rng.randint(0, 5))] + run[:2])
    ves = layout.get("pipeline_parallel_size", 1)
    memory = str(ves * 12 * TINY_LLAMA_BLOCK_BYTES)
    async with fake_engine(llama_dir, max_model_len=128, kv_cache_memory=memory, speculative_config=NGRAM,
                           **layout) as llm:
        finals = await all_finals(llm, prompts, counting(60))
        stats = llm.stats()
        assert_idle(llm)
    assert stats.num_preemptions > 0 and stats.spec_decode.num_accepted_tokens > 0
    assert [f.outputs[0].token_ids for f in finals] == [next_tokens(p[-1], 60, VOCAB) for p in prompts]


async def test_a_stop_string_inside_an_accepted_proposal_ends_the_output_as_without_speculation(llama_dir, tok_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    counted = next_tokens(11, 40, VOCAB)
    # The text of a token a few steps in, not seen in the output before it: the stop completes there.
    at = next(i for i in range(6, 30) if (text := tokenizer.decode([counted[i]])).strip()
              and text not in tokenizer.decode(counted[:i]))
    params = counting(40, stop=[tokenizer.decode([counted[at]])])
    k = NGRAM["num_speculative_tokens"]
    assert at % (k + 1) != k  # every proposal of COPY holds: the stop is a proposed token, more follow it
    finals = []
    for config in (None, NGRAM):
        async with fake_engine(llama_dir, skip_tokenizer_init=False, tokenizer=str(tok_dir),
                               speculative_config=config) as llm:
            finals.append((await stream(llm, COPY, params))[-1].outputs[0])
            if config is not None:
                assert llm.stats().spec_decode.num_accepted_tokens >= at
            assert_idle(llm)
    plain, spec = finals
    assert (spec.token_ids, spec.text, spec.finish_reason, spec.stop_reason) == \
        (plain.token_ids, plain.text, "stop", params.stop[0])
    assert spec.token_ids == counted[:at + 1]


async def test_blocks_full_of_accepted_tokens_are_cached_and_shared_correctly(llama_dir, layout):
    """A later prompt that continues an earlier one's prompt + output reuses the blocks its
    accepted proposals filled; the fake runner checks every position it reads there."""
    async with fake_engine(llama_dir, speculative_config=NGRAM, **layout) as llm:
        first = (await stream(llm, COPY, counting(40)))[-1].outputs[0]
        follow_up = COPY + first.token_ids[:33]
        second = (await stream(llm, follow_up, counting(10)))[-1]
        stats = llm.stats()
        assert_idle(llm)
    assert stats.spec_decode.num_accepted_tokens > 0
    assert second.num_cached_tokens == (len(follow_up) - 1) // 16 * 16 > len(COPY)  # blocks past the prompt
    assert second.outputs[0].token_ids == next_tokens(follow_up[-1], 10, VOCAB)
