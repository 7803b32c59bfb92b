"""Server-Sent Events: the `data: {json}\\n\\n` framing and a response that runs a producer
coroutine until it finishes or the client goes away (which cancels it)."""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"

Emit = Callable[[bytes], Awaitable[None]]
Producer = Callable[[Emit], Awaitable[None]]
T = TypeVar("T")


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def cancel_on_disconnect(receive: Receive, work: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Runs `work`, cancelling it if the client disconnects. Returns (finished, result).

    Call only once the request body has been read: from then on the server's `receive`
    answers nothing but `http.disconnect`."""
    result: list[T] = []
    error: list[Exception] = []
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result.append(await work())
        except Exception as exc:  # raised again outside the group, so not wrapped in an ExceptionGroup
            error.append(exc)
        tg.cancel_scope.cancel()
    if error:
        raise error[0]
    return bool(result), (result[0] if result else None)


class EventStreamResponse:
    """An ASGI response streaming what `producer` emits. The producer is a plain coroutine
    (not an async generator), so it may open task groups, and a disconnect cancels it
    through ordinary structured concurrency."""

    def __init__(self, producer: Producer, headers: dict[str, str] | None = None):
        self.producer = producer
        self.headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self.headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        finished, _ = await cancel_on_disconnect(receive, lambda: self.producer(emit))
        if finished:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
