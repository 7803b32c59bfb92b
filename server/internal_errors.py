"""Anything a route raises unexpectedly becomes a 500 with an error id (logged once, with the
traceback and the same id), instead of Starlette's re-raise, which uvicorn logs a second time."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asyncpp.server.errors import internal_error


class InternalErrors:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:
            if started:  # too late for a status: the server closes the connection
                raise
            await internal_error(exc).response()(scope, receive, send)
