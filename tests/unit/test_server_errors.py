"""HTTP statuses by exception type, without a model: each InvalidRequest's `param` reaches the
error JSON, and a 500 tells the client nothing of the exception (the server log has it)."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette

from asyncpp.core.errors import EngineDeadError, InvalidRequest, QueueFullError
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine.request_stream import RequestStream
from asyncpp.engine_args import EngineArgs
from asyncpp.prompts import PromptResolver
from asyncpp.server.app import build_app
from asyncpp.server.errors import to_server_error
from asyncpp.server.metrics import ServerMetrics
from asyncpp.server.serving import ServerState

SECRET = 'File "/srv/someone/asyncpp/engine/secret_internals.py", line 42'
VOCAB = 100

BAD_SAMPLING = [("n", {"n": 0}), ("temperature", {"temperature": -1}), ("top_p", {"top_p": 0}),
                ("top_k", {"top_k": -5}), ("min_p", {"min_p": 2}), ("max_tokens", {"max_tokens": 0}),
                ("min_tokens", {"min_tokens": -1}), ("min_tokens", {"min_tokens": 5, "max_tokens": 4}),
                ("presence_penalty", {"presence_penalty": 3}), ("frequency_penalty", {"frequency_penalty": -3}),
                ("repetition_penalty", {"repetition_penalty": 0}), ("logprobs", {"logprobs": -1}),
                ("stop", {"stop": [""]}), ("stop_token_ids", {"stop_token_ids": [-1]}), ("seed", {"seed": 1.5})]
BAD_PROMPTS = [{}, "", [], [VOCAB], [-1], 3.5]


@pytest.mark.parametrize("param,values", BAD_SAMPLING, ids=[str(v) for _, v in BAD_SAMPLING])
def test_sampling_params_name_their_field(param, values):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**values)
    assert info.value.param == param and str(info.value).startswith(f"SamplingParams.{param} ")
    error = to_server_error(info.value).body()["error"]
    assert (error["code"], error["type"], error["param"]) == (400, "BadRequestError", param)


def test_stop_token_outside_the_vocabulary_names_its_field():
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(stop_token_ids=[VOCAB]).verify_for_model(VOCAB)
    assert to_server_error(info.value).param == "stop_token_ids"


@pytest.mark.anyio
@pytest.mark.parametrize("prompt", BAD_PROMPTS, ids=repr)
async def test_bad_prompts_name_the_prompt(prompt):
    with pytest.raises(InvalidRequest) as info:
        await PromptResolver(None, VOCAB, max_model_len=64).resolve(prompt)
    assert to_server_error(info.value).param == "prompt"


class StubEngine:
    """Just enough of AsyncLLM for the routes: every request fails with `error`, at once or,
    with `in_stream`, from its stream."""
    model_name = "stub"
    tokenizer = None
    config = SimpleNamespace(max_model_len=256, max_logprobs=20, max_num_seqs=8, max_waiting_requests=8)

    def __init__(self, error: Exception, in_stream: bool = False):
        self.error, self.in_stream = error, in_stream

    def is_healthy(self) -> bool:
        raise self.error

    async def add_request(self, prompt, params, request_id=None) -> RequestStream:
        if not self.in_stream:
            raise self.error
        stream = RequestStream(request_id, lambda _: None)
        stream.fail(self.error)
        return stream


def stub_app(engine: StubEngine) -> Starlette:
    app = build_app(EngineArgs())
    app.state.server = ServerState(engine, ServerMetrics(lambda: None, engine.model_name))  # no lifespan
    return app


def http(app: Starlette) -> httpx.AsyncClient:
    # Starlette raises an unhandled exception again after answering 500; the client gets the answer.
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://stub")


ENGINE_ERRORS = [
    (InvalidRequest("prompt is 300 tokens long", param="prompt"), 400, "BadRequestError", "prompt"),
    (InvalidRequest("SamplingParams.top_k must be ...", param="top_k"), 400, "BadRequestError", "top_k"),
    (InvalidRequest("request_id 'x' is already running"), 400, "BadRequestError", None),
    (QueueFullError("the waiting queue is full"), 503, "ServiceUnavailableError", None),
    (EngineDeadError("pipeline stage 1 died"), 503, "ServiceUnavailableError", None),
]


@pytest.mark.anyio
@pytest.mark.parametrize("error,status,kind,param", ENGINE_ERRORS, ids=[str(case[0]) for case in ENGINE_ERRORS])
async def test_engine_errors_map_by_type(error, status, kind, param):
    async with http(stub_app(StubEngine(error))) as client:
        response = await client.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == status
    body = response.json()["error"]
    assert (body["code"], body["type"], body["param"]) == (status, kind, param)
    assert str(error) in body["message"]
    assert ("retry-after" in response.headers) == (status == 503)


def assert_tells_nothing(response: httpx.Response, error: dict) -> None:
    assert (error["code"], error["type"], error["param"]) == (500, "InternalServerError", None)
    assert "secret" not in response.text and "RuntimeError" not in response.text


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_500_keeps_the_exception_in_the_log(stream, caplog):
    for in_stream in (False, True):
        caplog.clear()
        async with http(stub_app(StubEngine(RuntimeError(SECRET), in_stream))) as client:
            response = await client.post("/v1/completions", json={"prompt": "x", "stream": stream})
        if stream and in_stream:  # the stream had started: the error is its last event
            assert response.status_code == 200
            events = [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]
            error = events[-1]["error"]
        else:
            assert response.status_code == 500
            error = response.json()["error"]
        assert_tells_nothing(response, error)
        logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
        assert logged and SECRET in str(logged[0].exc_info[1])


@pytest.mark.anyio
async def test_500_from_a_route_itself():
    async with http(stub_app(StubEngine(RuntimeError(SECRET)))) as client:
        response = await client.get("/health")
    assert response.status_code == 500
    assert_tells_nothing(response, response.json()["error"])
