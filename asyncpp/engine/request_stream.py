"""The user's end of one request: cumulative outputs, newest wins, closing aborts."""
from __future__ import annotations

from collections.abc import Callable

import anyio

from asyncpp.core.outputs import RequestOutput


class RequestStream:
    """Async iterator of cumulative RequestOutputs.

    A slow consumer never makes the engine wait: outputs are cumulative, so only the
    newest one is kept. Closing the stream (or cancelling its consumer) before the request
    finished aborts it.
    """

    def __init__(self, request_id: str, on_close: Callable[[str], None]):
        self.request_id = request_id
        self._on_close = on_close
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = anyio.Event()
        self._done = False

    # -- engine side ---------------------------------------------------------------
    def put(self, output: RequestOutput) -> None:
        self._latest = output
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    # -- user side -----------------------------------------------------------------
    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            while self._latest is None and self._error is None:
                await self._event.wait()
                self._event = anyio.Event()
        except BaseException:
            self.close()
            raise
        if self._latest is None:
            self._done = True
            self._on_close(self.request_id)
            raise self._error  # type: ignore[misc]
        output, self._latest = self._latest, None
        if output.finished:
            self._done = True
            self._on_close(self.request_id)
        return output

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._on_close(self.request_id)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
