"""An AsyncLLM on its own event loop in a background thread (an anyio blocking portal), so
one engine can serve every test of a session whatever event loop each test runs on."""
from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from asyncpp.async_llm import AsyncLLM, EngineStats
from asyncpp.engine_args import EngineArgs


class EngineThread:
    def __init__(self, args: EngineArgs):
        self._stack = ExitStack()
        self.portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        try:
            self.engine: AsyncLLM = self._stack.enter_context(
                self.portal.wrap_async_context_manager(AsyncLLM(engine_args=args)))
        except BaseException:
            self._stack.close()
            raise

    def call(self, func: Any, *args: Any) -> Any:
        """`func(*args)` on the engine's loop (awaited there when it is a coroutine function)."""
        return self.portal.call(func, *args)

    def stats(self) -> EngineStats:
        return self.call(self.engine.stats)

    def wait_idle(self, timeout_s: float = 60) -> EngineStats:
        """The stats once no request runs, waits or holds a KV block (fails after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while not _idle(stats := self.stats()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the shared asyncpp engine is still busy after {timeout_s} s: {stats}")
            time.sleep(0.02)
        return stats

    def close(self) -> None:
        """Stops the engine (its stage processes and shared memory with it), then the thread."""
        self._stack.close()


def _idle(stats: EngineStats) -> bool:
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0
