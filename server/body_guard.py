"""Request bodies are bounded before anything parses them: a declared Content-Length over the
limit is answered 413 at once, a body that grows past it while read is cut off with 413, and
one that trickles in slower than `timeout_s` gets 408."""
from __future__ import annotations

from dataclasses import dataclass

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asyncpp.server.errors import ServerError


@dataclass(slots=True)
class BodyLimit:
    """Shared with the app's lifespan, which sets `max_bytes` once max_model_len is known."""
    max_bytes: int | None = None
    timeout_s: float = 60.0


class BodyGuard:
    def __init__(self, app: ASGIApp, limit: BodyLimit):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        max_bytes = self.limit.max_bytes
        if scope["type"] != "http" or max_bytes is None:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await too_large(max_bytes).response()(scope, receive, send)
            return
        await self.app(scope, _GuardedReceive(receive, max_bytes, self.limit.timeout_s), send)


def too_large(max_bytes: int) -> ServerError:
    return ServerError(413, f"the request body is over {max_bytes} bytes, this server's "
                            "--max-request-body-bytes")


class _GuardedReceive:
    """Counts body bytes; raises ServerError (which the app answers) over the limit or late."""

    def __init__(self, receive: Receive, max_bytes: int, timeout_s: float):
        self.receive, self.max_bytes = receive, max_bytes
        self.received, self.done = 0, False
        self.deadline = anyio.current_time() + timeout_s

    async def __call__(self) -> Message:
        if self.done:  # after the body only a disconnect can come, whenever the client leaves
            return await self.receive()
        with anyio.move_on_after(self.deadline - anyio.current_time()) as scope:
            message = await self.receive()
        if scope.cancelled_caught:
            raise ServerError(408, "the request body did not arrive in time")
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                raise too_large(self.max_bytes)
            self.done = not message.get("more_body", False)
        return message
