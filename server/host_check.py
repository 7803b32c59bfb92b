"""The `Host` header must name this server (`--allowed-hosts`): a page on another site that
a browser reaches through DNS rebinding sends its own name there, and gets 421."""
from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from asyncpp.server.errors import ServerError
from asyncpp.server.log_hygiene import printable


class HostCheck:
    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        self.app = app
        self.allowed = {_normalise(h) for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host")
            if host is not None and _hostname(host) not in self.allowed:
                error = ServerError(421, f"this server does not answer to Host {printable(host, 100)!r}; "
                                         "its operator can add the name with --allowed-hosts", "Host")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _hostname(host: str) -> str | None:
    """`example.com:8000` -> example.com, `[::1]:8000` -> ::1; None when unparsable."""
    try:
        return _normalise(urlsplit("//" + host).hostname or "")
    except ValueError:
        return None


def _normalise(name: str) -> str:
    return name.strip().strip("[]").rstrip(".").lower()
