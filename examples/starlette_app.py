"""Your own Starlette app with an AsyncLLM held for the app's lifespan: it starts with the
app, every request handler shares it, and it stops (stage processes too) with the app.

    python examples/starlette_app.py --port 8080
    curl -s localhost:8080/complete -d '{"prompt": "The capital of France is", "max_tokens": 16}'
    curl -sN localhost:8080/stream -d '{"prompt": "San Francisco is a"}'     # text as it comes
"""
from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from asyncpp import AsyncLLM, EngineArgs, SamplingParams
from asyncpp.core.errors import InvalidRequest


def build_app(engine_args: EngineArgs) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncLLM(engine_args=engine_args) as engine:
            app.state.engine = engine
            yield

    routes = [Route("/complete", complete, methods=["POST"]), Route("/stream", stream, methods=["POST"]),
              Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={InvalidRequest: bad_request})


async def _prompt_and_params(request: Request) -> tuple[str, SamplingParams]:
    body = await request.json()
    return body["prompt"], SamplingParams(temperature=0, max_tokens=int(body.get("max_tokens", 32)))


async def complete(request: Request) -> Response:
    prompt, params = await _prompt_and_params(request)
    async for out in request.app.state.engine.generate(prompt, params):
        pass  # outputs are cumulative: the last one holds the whole completion
    return JSONResponse({"text": out.outputs[0].text, "finish_reason": out.outputs[0].finish_reason})


async def stream(request: Request) -> Response:
    prompt, params = await _prompt_and_params(request)

    async def deltas() -> AsyncIterator[str]:
        # A client that disconnects cancels this generator, which aborts the request.
        sent = 0
        async for out in request.app.state.engine.generate(prompt, params):
            text = out.outputs[0].text
            yield text[sent:]
            sent = len(text)

    return StreamingResponse(deltas(), media_type="text/plain")


async def health(request: Request) -> Response:
    return Response(status_code=200 if request.app.state.engine.is_healthy() else 503)


async def bad_request(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=400)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: the bundled SmolLM2)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    ns = parser.parse_args()
    app = build_app(EngineArgs(model=ns.model, max_model_len=1024, kv_cache_memory="256MiB"))
    uvicorn.run(app, host=ns.host, port=ns.port, timeout_graceful_shutdown=5)
