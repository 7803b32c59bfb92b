"""asyncpp.Client against a running server, under asyncio and trio."""
from __future__ import annotations

from contextlib import aclosing

import pytest

from asyncpp import Client
from asyncpp.client import APIError
from helpers.http_server import API_KEY, CHAT_MESSAGES, COMPLETION_PROMPT, MAX_TOKENS, MODEL_NAME

GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(scope="module")
def server(server_pool):
    return server_pool.get(pipeline_parallel_size=1)


@pytest.mark.anyio
async def test_generate_and_stream(server, reference):
    async with Client(server.url, api_key=API_KEY) as client:
        assert await client.generate(COMPLETION_PROMPT, **GREEDY) == reference["completion"]
        deltas = [d async for d in client.stream(COMPLETION_PROMPT, **GREEDY)]
    assert len(deltas) > 1 and "".join(deltas) == reference["completion"]


@pytest.mark.anyio
async def test_chat_and_chat_stream(server, reference):
    async with Client(server.url, api_key=API_KEY, model=MODEL_NAME) as client:
        assert await client.chat(CHAT_MESSAGES, **GREEDY) == reference["chat"]
        deltas = [d async for d in client.chat_stream(CHAT_MESSAGES, **GREEDY)]
    assert "".join(deltas) == reference["chat"]


@pytest.mark.anyio
async def test_token_id_prompt(server, reference):
    async with Client(server.url, api_key=API_KEY) as client:
        assert await client.generate(reference["completion_prompt_ids"], **GREEDY) == reference["completion"]


@pytest.mark.anyio
async def test_models_and_health(server):
    async with Client(server.url, api_key=API_KEY) as client:
        assert await client.models() == [MODEL_NAME]
        assert await client.health() is True
    async with Client("http://127.0.0.1:9", timeout=2) as nobody:  # discard port: nothing listens
        assert await nobody.health() is False


@pytest.mark.anyio
async def test_server_errors_raise_api_error(server):
    async with Client(server.url, api_key=API_KEY) as client:
        with pytest.raises(APIError) as bad_value:
            await client.generate(COMPLETION_PROMPT, temperature=-1)
        with pytest.raises(APIError) as bad_stream:
            async for _ in client.stream(COMPLETION_PROMPT, top_p=7):
                pass
        with pytest.raises(APIError) as unknown_model:
            await client.chat(CHAT_MESSAGES, model="nope")
    assert (bad_value.value.status, bad_value.value.param) == (400, "temperature")
    assert (bad_stream.value.status, bad_stream.value.param) == (400, "top_p")
    assert unknown_model.value.status == 404 and unknown_model.value.type == "NotFoundError"
    async with Client(server.url) as anonymous:
        with pytest.raises(APIError) as unauthorized:
            await anonymous.models()
    assert unauthorized.value.status == 401


@pytest.mark.anyio
async def test_leaving_a_stream_early_aborts_the_request(server):
    before = server.wait_idle().generation_tokens_total
    max_tokens = 200
    async with Client(server.url, api_key=API_KEY) as client:
        async with aclosing(client.stream(COMPLETION_PROMPT, temperature=0, max_tokens=max_tokens,
                                          ignore_eos=True)) as stream:
            async for _ in stream:
                break
        assert server.wait_idle().generation_tokens_total - before < max_tokens
        assert await client.generate(COMPLETION_PROMPT, **GREEDY)
