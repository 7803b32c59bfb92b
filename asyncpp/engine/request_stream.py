"""The user's end of one request: cumulative outputs, newest wins, closing aborts."""
from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import ObjectReceiveStream

from asyncpp.core.outputs import RequestOutput


class RequestStream(ObjectReceiveStream[RequestOutput]):
    """An anyio object stream of cumulative RequestOutputs (`async for`, `async with`).

    A slow consumer never makes the engine wait: outputs are cumulative, so only the
    newest one is kept. `receive()` raises `anyio.EndOfStream` after the final output (and
    once the stream is closed), and the engine's error if the request failed. Closing the
    stream (or cancelling its consumer) before the request finished aborts it.
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
    async def receive(self) -> RequestOutput:
        if self._done:
            raise anyio.EndOfStream
        try:
            while self._latest is None and self._error is None:
                await self._event.wait()
                self._event = anyio.Event()
        except BaseException:
            self.close()
            raise
        if self._latest is None:
            self.close()
            raise self._error  # type: ignore[misc]
        output, self._latest = self._latest, None
        if output.finished:
            self.close()
        return output

    def close(self) -> None:
        """No more outputs for this reader; aborts the request if it is still running."""
        if not self._done:
            self._done = True
            self._on_close(self.request_id)

    async def aclose(self) -> None:
        self.close()
