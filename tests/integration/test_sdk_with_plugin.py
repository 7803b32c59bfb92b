"""The SDK tested the way users test their apps: with asyncpp's own pytest plugin
(asyncpp_engine, asyncpp_server, asyncpp_client, asyncpp_engine_args) on the tiny random
model, under asyncio and trio. P = 1 here, so the session's engines are threads: a P > 1
engine's stage processes would outlive the test that started them, which conftest.py's
leak check forbids (test_pytest_plugin.py runs P = 2 in sessions of its own)."""
from __future__ import annotations

import anyio
import pytest
from openai import AsyncOpenAI

from asyncpp import AsyncLLM, SamplingParams

pytestmark = [pytest.mark.asyncpp(model="tiny"), pytest.mark.anyio]

PROMPT = "San Francisco is a"
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


async def test_engine_server_and_own_engine_agree(asyncpp_engine, asyncpp_client, asyncpp_engine_args):
    outputs = [out async for out in asyncpp_engine.generate(PROMPT, GREEDY)]
    lengths = [len(out.outputs[0].token_ids) for out in outputs]
    assert lengths == sorted(lengths) and lengths[-1] == 12 and outputs[-1].finished  # cumulative
    over_http = await asyncpp_client.generate(PROMPT, temperature=0, max_tokens=12, ignore_eos=True)
    async with AsyncLLM(engine_args=asyncpp_engine_args) as own:  # on this test's event loop
        async for last in own.generate(PROMPT, GREEDY):
            pass
    assert outputs[-1].outputs[0].text == over_http == last.outputs[0].text


async def test_closing_a_stream_frees_its_blocks_at_once(asyncpp_engine):
    async with await asyncpp_engine.add_request(PROMPT, LONG) as stream:
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 4:
                assert asyncpp_engine.stats().kv_blocks_used > 0
                break
    stats = asyncpp_engine.stats()
    assert (stats.num_running, stats.kv_blocks_used) == (0, 0)


async def test_cancelling_the_consumer_aborts_its_request(asyncpp_engine):
    started = anyio.Event()
    finish_reasons = []

    async def consume() -> None:
        async for out in asyncpp_engine.generate(PROMPT, LONG, request_id="to-cancel"):
            finish_reasons.append(out.outputs[0].finish_reason)
            started.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await started.wait()
        tg.cancel_scope.cancel()  # the consumer is waiting for its next output
    stats = asyncpp_engine.stats()
    assert (stats.num_running, stats.kv_blocks_used) == (0, 0)
    assert "length" not in finish_reasons
    assert await asyncpp_engine.abort("to-cancel") is False  # gone already


async def test_streams_and_chat_over_http(asyncpp_client):
    text = await asyncpp_client.generate(PROMPT, temperature=0, max_tokens=8)
    deltas = [delta async for delta in asyncpp_client.stream(PROMPT, temperature=0, max_tokens=8)]
    assert "".join(deltas) == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = await asyncpp_client.chat(messages, temperature=0, max_tokens=8)
    assert "".join([d async for d in asyncpp_client.chat_stream(messages, temperature=0, max_tokens=8)]) == chat


async def test_the_openai_client_against_the_server(asyncpp_server):
    async with AsyncOpenAI(base_url=f"{asyncpp_server}/v1", api_key="unused", max_retries=0) as client:
        (model,) = (await client.models.list()).data
        completion = await client.completions.create(model=model.id, prompt=PROMPT, max_tokens=6, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens <= 6
