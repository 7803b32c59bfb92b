"""AsyncLLM end to end without a model: a fake runner (helpers/fake_runner.py) answers each
sequence with its last token + 1, so every output is known, and checks every KV read.
Under the uni backend (P = 1) and, where it matters, the mp backend (P = 2, two VEs)."""
from __future__ import annotations

import random

import anyio
import pytest

from asyncpp import AsyncLLM
from asyncpp.core.errors import MicrobatchError
from asyncpp.core.outputs import RequestOutput
from helpers.fake_engine import abort_each_after_three, all_finals, assert_idle, counting, fake_engine, stream
from helpers.fake_runner import POISON, next_tokens
from helpers.models import TINY_LLAMA_BLOCK_BYTES, VOCAB

pytestmark = pytest.mark.anyio

EOS = 2  # the tiny checkpoints' eos_token_id







async def test_stream_is_cumulative_and_ends_at_max_tokens(llama_dir, layout):
    async with fake_engine(llama_dir, **layout) as llm:
        outs = await stream(llm, [10, 20, 30], counting(6))
        assert_idle(llm)
    tokens = [out.outputs[0].token_ids for out in outs]
    assert tokens[-1] == next_tokens(30, 6, VOCAB) == [31, 32, 33, 34, 35, 36]
    assert all(a == tokens[-1][:len(a)] for a in tokens)  # each output extends the one before
    assert [len(a) for a in tokens] == sorted({len(a) for a in tokens})
    assert [out.finished for out in outs] == [False] * (len(outs) - 1) + [True]
    assert outs[-1].outputs[0].finish_reason == "length"


async def test_n_sequences_each_complete(llama_dir):
    async with fake_engine(llama_dir) as llm:
        final = (await stream(llm, [7, 8], counting(4, n=3)))[-1]
    assert [c.index for c in final.outputs] == [0, 1, 2]
    assert all(c.token_ids == [9, 10, 11, 12] and c.finish_reason == "length" for c in final.outputs)


async def test_stop_token_ids_and_eos(llama_dir):
    async with fake_engine(llama_dir) as llm:
        stopped = (await stream(llm, [40], counting(10, stop_token_ids=[44])))[-1].outputs[0]
        eos = (await stream(llm, [997], counting(10)))[-1].outputs[0]  # 998, 999, 0, 1, 2
        through = (await stream(llm, [997], counting(10, ignore_eos=True)))[-1].outputs[0]
        assert_idle(llm)
    assert (stopped.token_ids, stopped.finish_reason, stopped.stop_reason) == ([41, 42, 43, 44], "stop", 44)
    assert (eos.token_ids, eos.finish_reason, eos.stop_reason) == ([998, 999, 0, 1, EOS], "stop", None)
    assert (through.token_ids, through.finish_reason) == (next_tokens(997, 10, VOCAB), "length")


async def test_max_model_len_caps_an_open_ended_request(llama_dir):
    prompt = list(range(100, 160))
    async with fake_engine(llama_dir, max_model_len=64) as llm:
        capped = (await stream(llm, prompt, counting(None)))[-1].outputs[0]
    assert (capped.token_ids, capped.finish_reason) == ([160, 161, 162, 163], "length")


async def test_abort_mid_stream_frees_every_block(llama_dir, layout):
    async with fake_engine(llama_dir, **layout) as llm:
        finals = await abort_each_after_three(llm, [[3 + i] * 20 for i in range(4)])
        assert_idle(llm)
    assert {out.outputs[0].finish_reason for out in finals} == {"abort"}


async def test_preemption_in_a_tiny_cache_keeps_outputs_right(llama_dir, layout):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 800) for _ in range(rng.randint(10, 40))] for _ in range(8)]
    ves = layout.get("pipeline_parallel_size", 1)
    blocks_per_ve = 10  # room for one max_model_len sequence; eight sequences contend for it
    memory = str(ves * blocks_per_ve * TINY_LLAMA_BLOCK_BYTES)
    async with fake_engine(llama_dir, max_model_len=128, kv_cache_memory=memory, **layout) as llm:
        finals = await all_finals(llm, prompts, counting(60))
        stats = llm.stats()
        assert_idle(llm)
    assert stats.num_preemptions > 0 and stats.kv_blocks_total == ves * blocks_per_ve
    assert [f.outputs[0].token_ids for f in finals] == [next_tokens(p[-1], 60, VOCAB) for p in prompts]


async def test_runner_exception_fails_its_request_naming_it_and_the_engine_serves_on(llama_dir, layout):
    async with fake_engine(llama_dir, **layout) as llm:
        with pytest.raises(MicrobatchError, match="stage 0 .*RuntimeError: fake runner: a prompt starting with 500"):
            await stream(llm, [POISON, 7], counting(4))
        assert llm.is_healthy()
        assert_idle(llm)
        after = (await stream(llm, [10], counting(3)))[-1].outputs[0]
    assert after.token_ids == [11, 12, 13]


def _failing_runner_factory(config, stage, tp_group):
    raise RuntimeError("this stage cannot load its weights")


async def test_a_failed_start_raises_its_cause_and_leaves_nothing_running(llama_dir):
    engine = AsyncLLM(str(llama_dir), runner_factory=_failing_runner_factory, skip_tokenizer_init=True,
                      dtype="float32", device="cpu")
    with pytest.raises(Exception, match="cannot load its weights"):
        async with engine:
            pass
    assert not engine.is_healthy()


async def test_shared_prefixes_with_n_aborts_and_preemption_read_the_right_kv(llama_dir, layout):
    """Prefix caching under every hazard at once; the fake runner checks each KV read, so a
    block shared while wrong (or freed while shared) fails a request."""
    rng = random.Random(1)
    system = [rng.randrange(3, 800) for _ in range(40)]  # 2.5 blocks
    prompts = [system[:rng.choice([8, 16, 32, 40])] + [rng.randrange(3, 800) for _ in range(rng.randint(1, 20))]
               for _ in range(12)]
    ves = layout.get("pipeline_parallel_size", 1)
    memory = str(ves * 14 * TINY_LLAMA_BLOCK_BYTES)
    async with fake_engine(llama_dir, max_model_len=128, kv_cache_memory=memory, max_num_batched_tokens=32,
                           **layout) as llm:
        finals: dict[int, RequestOutput] = {}

        async def run(i: int) -> None:
            async for out in llm.generate({"prompt_token_ids": prompts[i]}, counting(30, n=2), f"r{i}"):
                finals[i] = out
                if i % 4 == 3 and len(out.outputs[0].token_ids) >= 5:
                    await llm.abort(f"r{i}")

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(run, i)
        stats = llm.stats()
        assert_idle(llm)
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0
    for i, final in finals.items():
        for completion in final.outputs:
            want = next_tokens(prompts[i][-1], 30, VOCAB)
            if i % 4 == 3:
                assert completion.token_ids == want[:len(completion.token_ids)]
            else:
                assert completion.token_ids == want
