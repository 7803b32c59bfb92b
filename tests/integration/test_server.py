"""The OpenAI-compatible server, end to end over loopback HTTP: the official `openai`
client unchanged (at P = 1 and P = 2), SSE framing byte by byte, many streaming clients
with disconnects, every kind of bad input, metrics, tokenize, auth."""
from __future__ import annotations

import json
import re

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers.http_server import CHAT_MESSAGES, COMPLETION_PROMPT, MAX_MODEL_LEN, MAX_TOKENS, MODEL_NAME
from helpers.parity import hf_greedy, mixed_prompts

GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS}
# One running slot, one waiting place, and room for requests that need seconds to finish.
LONG_SERVER = {"max_num_seqs": 1, "max_waiting_requests": 1, "max_model_len": 1024}
EXTRAS = {"ignore_eos": True}


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.slow)], ids=["P1", "P2"])
def server(request, server_pool):
    """The same client tests at one pipeline stage and at two (mp backend)."""
    return server_pool.get(pipeline_parallel_size=request.param)


@pytest.fixture(scope="module")
def server1(server_pool):
    return server_pool.get(pipeline_parallel_size=1)


# -- the official openai client, unchanged ----------------------------------------------
@pytest.mark.anyio
async def test_openai_completion_equals_llm_generate(server, reference):
    async with server.openai() as client:
        out = await client.completions.create(model=MODEL_NAME, prompt=COMPLETION_PROMPT, extra_body=EXTRAS, **GREEDY)
    assert out.object == "text_completion" and out.model == MODEL_NAME
    assert out.choices[0].text == reference["completion"]
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == MAX_TOKENS
    assert out.usage.prompt_tokens == len(reference["completion_prompt_ids"])


@pytest.mark.anyio
async def test_openai_completion_stream(server, reference):
    async with server.openai() as client:
        stream = await client.completions.create(model=MODEL_NAME, prompt=COMPLETION_PROMPT, stream=True,
                                                 extra_body=EXTRAS, **GREEDY)
        chunks = [chunk async for chunk in stream]
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == reference["completion"]
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert {c.id for c in chunks} == {chunks[0].id}


@pytest.mark.anyio
async def test_openai_chat_equals_llm_generate(server, reference):
    async with server.openai() as client:
        out = await client.chat.completions.create(model=MODEL_NAME, messages=CHAT_MESSAGES, extra_body=EXTRAS,
                                                   **GREEDY)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference["chat"]
    assert out.usage.prompt_tokens == len(reference["chat_prompt_ids"])


@pytest.mark.anyio
async def test_openai_chat_stream(server, reference):
    async with server.openai() as client:
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=CHAT_MESSAGES, stream=True, stream_options={"include_usage": True},
            max_completion_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRAS)
        chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first, content, usage = chunks[0], chunks[1:-1], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert "".join(c.choices[0].delta.content for c in content) == reference["chat"]
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + ["length"]
    assert usage.choices == [] and usage.usage.completion_tokens == MAX_TOKENS


@pytest.mark.anyio
async def test_openai_models(server):
    async with server.openai() as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


@pytest.mark.anyio
async def test_token_ids_equal_transformers(server, llama_dir, reference):
    """Token-id prompts, as vLLM accepts them; the ids streamed back are HF's greedy ids."""
    prompt = mixed_prompts(1, lo=40, hi=40, seed=3)[0]
    body = {"model": MODEL_NAME, "prompt": prompt, "stream": True, "return_token_ids": True, **GREEDY, **EXTRAS}
    ids = []
    async with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
    assert ids == hf_greedy(llama_dir, [prompt], MAX_TOKENS)[0]


# -- SSE framing --------------------------------------------------------------------------
@pytest.mark.anyio
async def test_sse_framing_byte_by_byte(server1, reference):
    body = {"prompt": COMPLETION_PROMPT, "stream": True, "stream_options": {"include_usage": True}, **GREEDY, **EXTRAS}
    async with server1.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([part async for part in response.aiter_raw()])
    assert re.fullmatch(rb"(data: [^\n]+\n\n)+", raw), raw[:200]
    assert raw.endswith(b"\n\ndata: [DONE]\n\n") and raw.count(b"[DONE]") == 1
    events = [json.loads(e[len(b"data: "):]) for e in raw.split(b"\n\n")[:-2]]
    *chunks, usage = events
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference["completion"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == MAX_TOKENS


# -- many clients, a third of them leaving early ------------------------------------------
@pytest.mark.anyio
async def test_64_streams_a_third_disconnecting(server):
    prompts = mixed_prompts(64, lo=4, hi=100, seed=7)
    max_tokens = 48
    finished: dict[int, tuple[str, int]] = {}

    async def client(i: int, http: httpx.AsyncClient) -> None:
        body = {"prompt": prompts[i], "stream": True, "return_token_ids": True, "temperature": 0,
                "max_tokens": max_tokens, "ignore_eos": True}
        tokens = 0
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                tokens += len(choice["token_ids"])
                if i % 3 == 0:
                    return  # leaves mid-stream: closing the response drops the connection
                if choice["finish_reason"]:
                    finished[i] = (choice["finish_reason"], tokens)

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with server.http(limits=limits) as http, anyio.create_task_group() as tg:
        for i in range(64):
            tg.start_soon(client, i, http)
    assert finished == {i: ("length", max_tokens) for i in range(64) if i % 3}
    server.wait_idle()  # the disconnected requests were aborted: every KV block is free again
    assert server.engine.stats().kv_blocks_used == 0
    async with server.http() as http:
        assert (await http.get("/health")).status_code == 200
        again = await http.post("/v1/completions", json={"prompt": prompts[0], **GREEDY})
        assert again.status_code == 200


@pytest.mark.anyio
async def test_abort_on_disconnect_of_a_whole_response(server_pool):
    """A client that gives up on a non-streamed request aborts it too."""
    server = server_pool.get(**LONG_SERVER)
    body = {"prompt": COMPLETION_PROMPT, "temperature": 0, "max_tokens": 1000, "ignore_eos": True}
    before = server.wait_idle().generation_tokens_total
    async with server.http() as http:
        with anyio.move_on_after(0.3):
            await http.post("/v1/completions", json=body)
    assert server.wait_idle().generation_tokens_total - before < 1000


# -- bad input ----------------------------------------------------------------------------
_LONG = list(range(3, 3 + MAX_MODEL_LEN + 10))
BAD_REQUESTS = [
    ("malformed json", "/v1/completions", b'{"prompt": "x",', 400, None),
    ("not an object", "/v1/completions", b"[1, 2]", 400, None),
    ("missing prompt", "/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("prompt of the wrong type", "/v1/completions", {"prompt": 3}, 400, "prompt"),
    ("negative temperature", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("top_p above 1", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("zero max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("n not a number", "/v1/completions", {"prompt": "x", "n": "two"}, 400, "n"),
    ("negative top_k", "/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("token id out of vocab", "/v1/completions", {"prompt": [5, 10**6]}, 400, "prompt"),
    ("stop token id out of vocab", "/v1/completions",
     {"prompt": "x", "stop_token_ids": [10**6], "min_tokens": 2}, 400, "stop_token_ids"),
    ("prompt over max_model_len", "/v1/completions", {"prompt": _LONG}, 400, "prompt"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-5"}, 404, "model"),
    ("unsupported echo", "/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("chat without messages", "/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("chat message without role", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages"),
    ("chat bad penalty", "/v1/chat/completions",
     {"messages": CHAT_MESSAGES, "presence_penalty": 9}, 400, "presence_penalty"),
    ("chat unknown model", "/v1/chat/completions", {"messages": CHAT_MESSAGES, "model": "nope"}, 404, "model"),
    ("detokenize out of vocab", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("empty cache_salt", "/v1/completions", {"prompt": "x", "cache_salt": ""}, 400, "cache_salt"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
async def test_bad_input_gets_its_status_and_error_json(server1, name, path, body, status, param):
    async with server1.http() as http:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await http.post(path, content=content, headers={"content-type": "application/json"})
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == status and error["message"]
        assert error["param"] == param
        if name == "prompt over max_model_len":
            assert str(len(_LONG)) in error["message"] and str(MAX_MODEL_LEN) in error["message"]
        good = await http.post("/v1/completions", json={"prompt": COMPLETION_PROMPT, **GREEDY})
        assert good.status_code == 200  # and the server keeps serving


@pytest.mark.anyio
@pytest.mark.parametrize("method,path,status", [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)])
async def test_unknown_routes_answer_error_json(server1, method, path, status):
    async with server1.http() as http:
        response = await http.request(method, path)
    assert response.status_code == status and response.json()["error"]["code"] == status


@pytest.mark.anyio
async def test_queue_full_is_503_with_retry_after(server_pool):
    server = server_pool.get(**LONG_SERVER)
    long = {"prompt": COMPLETION_PROMPT, "temperature": 0, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    async with server.http() as http:
        async with http.stream("POST", "/v1/completions", json=long) as running:
            lines = running.aiter_lines()  # held: a dropped iterator closes the connection when collected
            await lines.__anext__()  # the only slot is taken
            async with http.stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200  # accepted into the one-place queue
                refused = await http.post("/v1/completions", json={"prompt": COMPLETION_PROMPT})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == 503
        server.wait_idle()
        assert (await http.post("/v1/completions", json={"prompt": COMPLETION_PROMPT, **GREEDY})).status_code == 200


# -- auth, metrics, tokenize, version -----------------------------------------------------
@pytest.mark.anyio
async def test_api_key_required_except_health_and_metrics(server1):
    async with server1.http(api_key=None) as anonymous, server1.http(api_key="wrong") as wrong:
        for client in (anonymous, wrong):
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize")]:
                response = await client.request(method, path, json={"prompt": "x"})
                assert response.status_code == 401 and response.json()["error"]["code"] == 401
        assert (await anonymous.get("/health")).status_code == 200
        assert (await anonymous.get("/metrics")).status_code == 200


@pytest.mark.anyio
async def test_metrics(server1):
    async with server1.http() as http:
        await http.post("/v1/completions", json={"prompt": COMPLETION_PROMPT, "stream": True, **GREEDY})
        text = (await http.get("/metrics")).text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name != "asyncpp:stage_busy_fraction"}
    for name in ("asyncpp:num_requests_running", "asyncpp:num_requests_waiting", "asyncpp:kv_cache_usage_perc",
                 "asyncpp:pipeline_bubble_fraction"):
        assert name in samples
    assert samples["asyncpp:prompt_tokens_total"] > 0
    assert samples["asyncpp:generation_tokens_total"] >= MAX_TOKENS
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert samples[f"asyncpp:{histogram}_count"] > 0
    assert 'asyncpp:stage_busy_fraction{model_name="tiny-llama",stage="0"}' in text
    assert 'asyncpp:stage_layers{model_name="tiny-llama",stage="0"}' in text
    assert samples["asyncpp:microbatches_in_flight_max"] >= 1


@pytest.mark.anyio
async def test_prefix_cache_metrics_salt_and_no_reset_by_default(server1):
    prompt = mixed_prompts(1, lo=80, hi=80, seed=11)[0]

    async def complete(http: httpx.AsyncClient, **extra) -> dict[str, float]:
        out = (await http.post("/v1/completions", json={"prompt": prompt, **GREEDY, **EXTRAS, **extra})).json()
        assert out["choices"][0]["finish_reason"] == "length"
        text = (await http.get("/metrics")).text
        return {"cached_tokens": out["usage"]["prompt_tokens_details"]["cached_tokens"],
                **{s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name.startswith("asyncpp:prefix_cache") or s.name.startswith("asyncpp:kv_cache_blocks")}}

    async with server1.http() as http:
        await complete(http)
        before = await complete(http, cache_salt="tenant-a")  # another salt: a miss
        after = await complete(http, cache_salt="tenant-a")  # the same salt: 64 tokens cached (4 blocks)
        assert after["asyncpp:prefix_cache_queries_total"] - before["asyncpp:prefix_cache_queries_total"] == 80
        assert after["asyncpp:prefix_cache_hits_total"] - before["asyncpp:prefix_cache_hits_total"] == 64
        assert (before["cached_tokens"], after["cached_tokens"]) == (0, 64)
        assert after["asyncpp:kv_cache_blocks_used"] == 0 and after["asyncpp:kv_cache_blocks_cached"] >= 4
        # Off by default (a client could empty every other client's cache), as vLLM without dev mode.
        assert (await http.post("/reset_prefix_cache")).status_code == 404
        assert (await complete(http, cache_salt="tenant-a"))["cached_tokens"] == 64


@pytest.mark.anyio
async def test_tokenize_detokenize_version(server1, tok_dir, reference):
    async with server1.http() as http:
        tokens = (await http.post("/tokenize", json={"prompt": COMPLETION_PROMPT})).json()
        assert tokens["tokens"] == reference["completion_prompt_ids"]
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_MODEL_LEN
        chat = (await http.post("/tokenize", json={"messages": CHAT_MESSAGES})).json()
        assert chat["tokens"] == reference["chat_prompt_ids"]
        text = (await http.post("/detokenize", json={"tokens": tokens["tokens"]})).json()["prompt"]
        assert text == COMPLETION_PROMPT
        assert (await http.get("/version")).json()["version"]


@pytest.mark.anyio
async def test_several_prompts_and_n(server1, reference):
    async with server1.http() as http:
        body = {"prompt": [COMPLETION_PROMPT, COMPLETION_PROMPT], "n": 2, **GREEDY, **EXTRAS}
        out = (await http.post("/v1/completions", json=body)).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == reference["completion"] for c in out["choices"])
    assert out["usage"]["completion_tokens"] == 4 * MAX_TOKENS


@pytest.mark.anyio
async def test_logprobs(server1, reference):
    async with server1.http() as http:
        body = {"prompt": COMPLETION_PROMPT, "logprobs": 2, **GREEDY, **EXTRAS}
        out = (await http.post("/v1/completions", json=body)).json()["choices"][0]
        chat_body = {"messages": CHAT_MESSAGES, "logprobs": True, "top_logprobs": 2, **GREEDY, **EXTRAS}
        chat = (await http.post("/v1/chat/completions", json=chat_body)).json()["choices"][0]
    logprobs = out["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == MAX_TOKENS
    assert all(len(top) == 2 and max(top.values()) <= 0 for top in logprobs["top_logprobs"])
    # greedy: the sampled token is the most likely one
    assert all(lp == pytest.approx(max(top.values())) for lp, top in
               zip(logprobs["token_logprobs"], logprobs["top_logprobs"]))
    assert len(chat["logprobs"]["content"]) == MAX_TOKENS
    assert all(len(item["top_logprobs"]) == 2 for item in chat["logprobs"]["content"])
