"""uvicorn's server, ending the requests in flight as it begins to shut down: each stream gets
an SSE error event and `data: [DONE]`, a whole response a 503, at once; uvicorn itself lets
them run for its grace period and then cancels them mid-response (clients see a protocol
error, the log a CancelledError traceback)."""
from __future__ import annotations

import logging
import socket

import uvicorn
from starlette.types import ASGIApp

from asyncpp.server.errors import ServerShuttingDown

logger = logging.getLogger("asyncpp.server")


class GracefulServer(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        end_requests(self.config.app)
        await super().shutdown(sockets)


def end_requests(app: ASGIApp) -> None:
    state = getattr(getattr(app, "state", None), "server", None)
    if state is None:  # the engine never started
        return
    ended = state.engine.stop(ServerShuttingDown())
    if ended:
        logger.info("shutting down: %d request(s) in flight end with an error", ended)
