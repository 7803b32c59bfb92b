"""uvicorn's h11 protocol with two guards against idle connections, which uvicorn itself
keeps for ever until the first request arrives (its keep-alive timeout starts only after a
response) and counts against `limit_concurrency`, so that a few thousand idle sockets would
make it refuse every real request with 503:

* a request's headers must arrive within `header_timeout_s` of its first byte (or of the
  connection opening), else the connection is closed;
* at the connection limit, a new connection closes the longest-idle one that has no request
  in flight, so idle sockets cannot lock out a real client (/health included)."""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0

    @classmethod
    def with_header_timeout(cls, seconds: float) -> type[GuardedH11Protocol]:
        return type(cls.__name__, (cls,), {"header_timeout_s": seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.idle_since = self.loop.time()
        self.header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()
        if self.limit_concurrency is not None and len(self.connections) >= self.limit_concurrency:
            self._close_longest_idle()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.between_requests():
            if self.header_timer is None:
                self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.idle_since = self.loop.time()

    def between_requests(self) -> bool:
        return self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE

    def _arm_header_timer(self) -> None:
        self.header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_late(self) -> None:
        self.header_timer = None
        if self.between_requests():
            self.close_idle()

    def close_idle(self) -> None:
        if not self.transport.is_closing():
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def _close_longest_idle(self) -> None:
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and c.between_requests()
                and not c.transport.is_closing()]
        if idle:
            min(idle, key=lambda c: c.idle_since).close_idle()
