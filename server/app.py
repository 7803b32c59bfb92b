"""The Starlette app: OpenAI-compatible routes around one AsyncLLM held for the app's lifespan."""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TypeVar

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asyncpp import __version__
from asyncpp.async_llm import AsyncLLM
from asyncpp.core.errors import EngineDeadError, InvalidRequest
from asyncpp.engine_args import EngineArgs
from asyncpp.server.auth import BearerAuth
from asyncpp.server.body_guard import BodyGuard, BodyLimit
from asyncpp.server.chat import chat_prompt, create_chat_completion
from asyncpp.server.completions import create_completion
from asyncpp.server.errors import ServerError, engine_unhealthy, to_server_error
from asyncpp.server.host_check import HostCheck
from asyncpp.server.internal_errors import InternalErrors
from asyncpp.server.log_hygiene import printable
from asyncpp.server.metrics import ServerMetrics
from asyncpp.server.openapi import Endpoint, openapi_document
from asyncpp.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    describe_validation_error,
)
from asyncpp.server.serving import ServerState
from asyncpp.server.settings import ServerSettings
from asyncpp.server.stats_log import log_stats_every

Handler = Callable[[Request], Awaitable[Response]]


def build_app(engine: AsyncLLM | EngineArgs, *, api_key: str | None = None,
              settings: ServerSettings | None = None) -> Starlette:
    """An app that starts the engine (an `AsyncLLM`, or one made from `EngineArgs` then) on
    startup and closes it on shutdown. With an API key (`api_key` or `settings.api_key`),
    every route but the open ones needs `Authorization: Bearer <key>`."""
    settings = settings or ServerSettings(api_key=api_key)
    body_limit = BodyLimit(settings.max_request_body_bytes, settings.timeout_request_body_s)
    args = engine.args if isinstance(engine, AsyncLLM) else engine

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        llm = engine if isinstance(engine, AsyncLLM) else AsyncLLM.from_engine_args(engine)
        async with llm, anyio.create_task_group() as tasks:
            app.state.server = ServerState(llm, ServerMetrics(llm.stats, llm.model_name), settings)
            body_limit.max_bytes = settings.body_limit(llm.config.max_model_len)
            if settings.trust_request_chat_template:
                await llm.start_template_renderers()
            if settings.log_stats_interval_s:
                tasks.start_soon(log_stats_every, settings.log_stats_interval_s, llm.stats)
            yield
            tasks.cancel_scope.cancel()

    table = served_endpoints(settings)
    maxima = {"n": args.max_num_seqs, "logprobs": args.max_logprobs, "top_logprobs": args.max_logprobs,
              "prompt_logprobs": args.max_logprobs}
    document = openapi_document([e for e, _ in table], auth=settings.api_key is not None, maxima=maxima)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    routes = [Route(e.path, handler, methods=[e.method]) for e, handler in table]
    routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    middleware = [Middleware(HostCheck, allowed_hosts=settings.allowed_hosts)] if settings.allowed_hosts else []
    if settings.api_key:
        open_paths = {e.path for e, _ in table if e.open} | {"/openapi.json"}
        middleware.append(Middleware(BearerAuth, api_key=settings.api_key, open_paths=open_paths))
    middleware += [Middleware(BodyGuard, limit=body_limit), Middleware(InternalErrors)]
    handlers = {ServerError: _server_error, HTTPException: _http_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)


def endpoints() -> list[tuple[Endpoint, Handler]]:
    """Every route with what the OpenAPI document says of it."""
    streams = ("application/json", "text/event-stream")
    engine_errors = (404, 503)
    return [
        (Endpoint("/v1/completions", "POST", "Create a completion", CompletionRequest, streams, engine_errors),
         _with_body(CompletionRequest, create_completion)),
        (Endpoint("/v1/chat/completions", "POST", "Create a chat completion", ChatCompletionRequest, streams,
                  engine_errors), _with_body(ChatCompletionRequest, create_chat_completion)),
        (Endpoint("/v1/models", "GET", "List the served model"), models),
        (Endpoint("/health", "GET", "200 while the engine is healthy", ok_media=(), errors=(503,), open=True),
         health),
        (Endpoint("/version", "GET", "The server's version", open=True), version),
        (Endpoint("/tokenize", "POST", "Tokenize a prompt or chat messages", TokenizeRequest, errors=(404,)),
         _with_body(TokenizeRequest, tokenize)),
        (Endpoint("/detokenize", "POST", "Turn token ids into text", DetokenizeRequest, errors=(404,)),
         _with_body(DetokenizeRequest, detokenize)),
        (Endpoint("/metrics", "GET", "Prometheus metrics", ok_media=(CONTENT_TYPE_LATEST,), open=True), metrics),
        (Endpoint("/reset_prefix_cache", "POST", "Forget every cached prefix (running requests keep theirs)",
                  dev=True), reset_prefix_cache),
    ]

def served_endpoints(settings: ServerSettings) -> list[tuple[Endpoint, Handler]]:
    """The routes these settings serve: the dev ones only when enabled (else 404, as vLLM
    without VLLM_SERVER_DEV_MODE); /metrics behind the key when so asked."""
    table = []
    for e, handler in endpoints():
        if e.dev and not settings.enable_dev_endpoints:
            continue
        if e.path == "/metrics" and settings.metrics_require_key:
            e = replace(e, open=False)
        table.append((e, handler))
    return table


Body = TypeVar("Body", bound=BaseModel)


def _with_body(model: type[Body], handler: Callable[[ServerState, Body, Request], Awaitable[Response]]) -> Handler:
    async def endpoint(request: Request) -> Response:
        _check_json(request)
        try:
            body = model.model_validate_json(await request.body())
        except ValidationError as exc:
            message, param = describe_validation_error(exc)
            raise ServerError(400, message, param) from exc
        return await handler(_state(request), body, request)
    return endpoint


def _check_json(request: Request) -> None:
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        shown = printable(media, 100) if media else "none"
        raise ServerError(415, f"the body must be JSON sent with Content-Type: application/json (got {shown})")


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def models(request: Request) -> Response:
    state = _state(request)
    config = state.engine.config
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "asyncpp",
            "root": config.model_path, "parent": None, "max_model_len": config.max_model_len}
    return JSONResponse({"object": "list", "data": [card]})


async def health(request: Request) -> Response:
    engine = _state(request).engine
    if not engine.is_healthy():
        raise engine_unhealthy(engine.dead_error() or EngineDeadError("the engine is not running", permanent=True))
    return Response(status_code=200)


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


async def tokenize(state: ServerState, body: TokenizeRequest, request: Request) -> Response:
    state.check_model(body.model)
    prompt = body.prompt if body.messages is None else chat_prompt(state, body.messages, body.add_generation_prompt)
    assert prompt is not None  # TokenizeRequest holds one of them
    try:
        ids = await state.engine.tokenize(prompt, add_special_tokens=body.add_special_tokens)
    except InvalidRequest as exc:
        raise to_server_error(exc) from exc
    return JSONResponse({"count": len(ids), "max_model_len": state.engine.config.max_model_len, "tokens": ids})


async def detokenize(state: ServerState, body: DetokenizeRequest, request: Request) -> Response:
    state.check_model(body.model)
    tokenizer = state.tokenizer_or_400("detokenize")
    vocab = state.engine.config.shape.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise ServerError(400, f"tokens must be ids in [0, {vocab})", "tokens")
    return JSONResponse({"prompt": await anyio.to_thread.run_sync(tokenizer.decode, body.tokens)})


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def reset_prefix_cache(request: Request) -> Response:
    freed = await _state(request).engine.reset_prefix_cache()
    return JSONResponse({"freed_blocks": freed})


async def _server_error(request: Request, exc: ServerError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return ServerError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()  # 405: Allow
