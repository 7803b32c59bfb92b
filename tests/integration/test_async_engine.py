"""AsyncLLM behaviour: streaming, aborts, cancellation, validation, both anyio backends."""
import random

import anyio
import pytest

from asyncpp import AsyncLLM, SamplingParams
from asyncpp.core.errors import EngineDeadError, QueueFullError
from helpers.parity import greedy, hf_greedy, mixed_prompts


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def engine(model_dir, **kw):
    kw.setdefault("skip_tokenizer_init", True)
    return AsyncLLM(str(model_dir), **kw)


@pytest.mark.anyio
async def test_stream_is_cumulative_and_matches_hf(llama_dir):
    prompt = mixed_prompts(1, lo=20, hi=20)[0]
    async with engine(llama_dir) as llm:
        seen = []
        async for out in llm.generate({"prompt_token_ids": prompt}, greedy(8), request_id="r1"):
            seen.append(list(out.outputs[0].token_ids))
        assert out.finished and out.outputs[0].finish_reason == "length"
    assert seen[-1] == hf_greedy(llama_dir, [prompt], 8)[0]
    assert all(seen[i] == seen[-1][:len(seen[i])] for i in range(len(seen)))


@pytest.mark.anyio
async def test_abort_half_of_50_frees_every_block(llama_dir):
    rng = random.Random(0)
    prompts = mixed_prompts(50, hi=120, seed=5)
    async with engine(llama_dir, max_num_seqs=16) as llm:
        finished = {}

        async def consume(i):
            async for out in llm.generate({"prompt_token_ids": prompts[i]}, greedy(24), request_id=f"r{i}"):
                finished[i] = out.outputs[0].finish_reason

        async def abort_later(i):
            await anyio.sleep(rng.uniform(0, 0.3))
            await llm.abort(f"r{i}")

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(consume, i)
                if i % 2:
                    tg.start_soon(abort_later, i)
        assert all(finished[i] == "length" for i in range(0, 50, 2))
        assert {finished[i] for i in range(1, 50, 2)} <= {"abort", "length"}
        assert "abort" in finished.values()
        stats = llm.stats()
        assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


@pytest.mark.anyio
async def test_cancelled_consumer_aborts_request(llama_dir):
    async with engine(llama_dir) as llm:
        with anyio.move_on_after(0.2):
            async for _ in llm.generate([5, 6, 7], greedy(10_000 // 20)):
                pass
        await anyio.sleep(0.1)
        assert llm.stats().kv_blocks_used == 0


@pytest.mark.anyio
async def test_invalid_requests_raise_clear_errors(llama_dir):
    async with engine(llama_dir, max_model_len=64, max_waiting_requests=2) as llm:
        with pytest.raises(ValueError, match="max_model_len"):
            await llm.add_request(list(range(3, 100)), greedy(4))
        with pytest.raises(ValueError, match="empty"):
            await llm.add_request([], greedy(4))
        with pytest.raises(ValueError, match="token id"):
            await llm.add_request([1, 10**6], greedy(4))
        with pytest.raises(ValueError, match="stop_token_ids holds 1000000"):
            await llm.add_request([3, 4], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[10**6]))
        with pytest.raises(ValueError, match="text prompts need a tokenizer"):
            await llm.add_request("hello", greedy(4))
        streams = [await llm.add_request([3, 4], greedy(4)) for _ in range(2)]
        with pytest.raises(QueueFullError):
            await llm.add_request([3, 4], greedy(4))
        for s in streams:
            await s.aclose()
    with pytest.raises(EngineDeadError):
        await llm.add_request([3, 4], greedy(4))


