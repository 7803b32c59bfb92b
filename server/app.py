"""The Starlette app: OpenAI-compatible routes around one AsyncLLM held for the app's lifespan."""
from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from asyncpp import __version__
from asyncpp.async_llm import AsyncLLM
from asyncpp.config import EngineArgs
from asyncpp.server.chat import chat_prompt_ids, create_chat_completion
from asyncpp.server.completions import create_completion
from asyncpp.server.errors import ServerError, internal_error, unavailable
from asyncpp.server.metrics import ServerMetrics
from asyncpp.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    describe_validation_error,
)
from asyncpp.server.serving import ServerState

OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


def build_app(args: EngineArgs, *, api_key: str | None = None) -> Starlette:
    """An app that starts `AsyncLLM(args)` on startup and closes it on shutdown.
    With `api_key`, every route but /health, /metrics and /version needs `Authorization: Bearer <key>`."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncLLM.from_engine_args(args) as engine:
            app.state.server = ServerState(engine, ServerMetrics(engine.stats, engine.model_name))
            yield

    routes = [
        Route("/v1/completions", _with_body(CompletionRequest, create_completion), methods=["POST"]),
        Route("/v1/chat/completions", _with_body(ChatCompletionRequest, create_chat_completion), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/tokenize", _with_body(TokenizeRequest, tokenize), methods=["POST"]),
        Route("/detokenize", _with_body(DetokenizeRequest, detokenize), methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    middleware = [Middleware(BearerAuth, api_key=api_key)] if api_key else []
    handlers = {ServerError: _server_error, HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)


Body = TypeVar("Body", bound=BaseModel)


def _with_body(model: type[Body], handler: Callable[[ServerState, Body, Request], Awaitable[Response]]
               ) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            body = model.model_validate_json(await request.body())
        except ValidationError as exc:
            message, param = describe_validation_error(exc)
            raise ServerError(400, message, param) from exc
        return await handler(_state(request), body, request)
    return endpoint


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
        raise unavailable(f"the engine is not healthy: {engine.dead_error()}")
    return Response(status_code=200)


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


async def tokenize(state: ServerState, body: TokenizeRequest, request: Request) -> Response:
    state.check_model(body.model)
    if body.messages is not None:
        ids = chat_prompt_ids(state, body.messages, body.add_generation_prompt)
    else:
        ids = state.tokenizer_or_400("tokenize").encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return JSONResponse({"count": len(ids), "max_model_len": state.engine.config.max_model_len, "tokens": ids})


async def detokenize(state: ServerState, body: DetokenizeRequest, request: Request) -> Response:
    state.check_model(body.model)
    tokenizer = state.tokenizer_or_400("detokenize")
    vocab = state.engine.config.shape.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise ServerError(400, f"tokens must be ids in [0, {vocab})", "tokens")
    return JSONResponse({"prompt": tokenizer.decode(body.tokens)})


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                error = ServerError(401, "invalid or missing API key: send `Authorization: Bearer <key>`")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _server_error(request: Request, exc: ServerError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return ServerError(exc.status_code, str(exc.detail)).response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette raises the exception again after this answer, and uvicorn logs its traceback.
    return internal_error().response()
