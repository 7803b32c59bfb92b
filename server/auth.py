"""`--api-key`: every route but the open ones (health, metrics, version, the API document)
needs `Authorization: Bearer <key>` (RFC 6750; the scheme's name is case-insensitive)."""
from __future__ import annotations

import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from asyncpp.server.errors import ServerError


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str, open_paths: set[str]):
        self.app, self.open_paths = app, frozenset(open_paths)
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths and not self._authorized(scope):
            error = ServerError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.expected)
