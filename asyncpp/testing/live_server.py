"""`asyncpp serve`'s app on a free loopback port, run by uvicorn in a background thread."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from starlette.applications import Starlette

from asyncpp.async_llm import AsyncLLM, EngineStats
from asyncpp.engine_args import EngineArgs
from asyncpp.server.app import build_app
from asyncpp.server.threaded import serve_in_thread


@dataclass(slots=True)
class LiveServer:
    url: str
    app: Starlette

    @property
    def engine(self) -> AsyncLLM:
        """Runs on the server's own loop: read its stats, never await it from elsewhere."""
        return self.app.state.server.engine

    def wait_idle(self, timeout_s: float = 60) -> EngineStats:
        """The stats once no request runs, waits or holds a KV block: a client that went away
        has its request aborted a moment later (fails after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.engine.stats()
            if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0:
                return stats
            if time.monotonic() > deadline:
                raise RuntimeError(f"the shared asyncpp server is still busy after {timeout_s} s: {stats}")
            time.sleep(0.02)


@contextmanager
def live_server(args: EngineArgs, api_key: str | None = None) -> Iterator[LiveServer]:
    """Yields once the engine has started; on exit the server stops, and the engine with it."""
    app = build_app(args, api_key=api_key)
    with serve_in_thread(app) as url:
        yield LiveServer(url, app)
