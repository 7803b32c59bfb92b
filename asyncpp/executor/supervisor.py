"""Owns the pipeline's executor: starts it, and when a stage dies or hangs, restarts every
stage (a new world, weights reloaded, KV caches re-made) without the engine process going
down, a bounded number of times within a window."""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import anyio
from anyio.abc import TaskGroup

from asyncpp.core.config import EngineConfig
from asyncpp.core.errors import EngineDeadError, NodeLostError
from asyncpp.executor.executor import Executor
from asyncpp.executor.factory import create_executor
from asyncpp.worker.worker import RunnerFactory

log = logging.getLogger("asyncpp")


class Supervisor:
    def __init__(self, config: EngineConfig, runner_factory: RunnerFactory):
        self.config = config
        self.runner_factory = runner_factory
        self.executor: Executor | None = None
        self.dead: BaseException | None = None  # for good: the engine cannot serve again
        self.restarting: BaseException | None = None  # the failure a restart is recovering from
        self._restarted = anyio.Event()
        self._restarts: deque[float] = deque()  # when each restart began
        self._task_group: TaskGroup | None = None
        self._blocks_per_ve = 0
        self._closing = False

    async def start(self, task_group: TaskGroup, blocks_per_ve: Callable[[int], int]) -> int:
        """Start the first executor; `blocks_per_ve` turns the blocks every rank can hold into
        each VE's share. Returns that share. A failure here is the caller's, not restarted."""
        self._task_group = task_group
        self.executor = create_executor(self.config, self.runner_factory)
        await self.executor.start(task_group)
        self._blocks_per_ve = blocks_per_ve(self.executor.num_available_blocks())
        await self.executor.init_kv_cache(self._blocks_per_ve)
        self.executor.on_dead = self._on_dead
        return self._blocks_per_ve

    def error(self) -> BaseException | None:
        """Why the engine cannot take requests now: dead for good, or restarting its stages."""
        if self.dead is not None:
            return self.dead
        if self.restarting is not None:
            return EngineDeadError(f"restarting the pipeline stages after: {self.restarting}")
        return None

    def _on_dead(self, executor: Executor, error: BaseException) -> None:
        """Called by the executor as it fails (every submission to it raises `error`)."""
        if executor is not self.executor or self.dead is not None or self.restarting is not None:
            return
        if isinstance(error, NodeLostError):  # a restart would wait for the node's resources forever
            self._die(EngineDeadError(f"{error} (not restarted: the stage's node is gone; start the engine again "
                                      "once the cluster has room for every stage)", permanent=True))
            return
        if not self._spend_restart(error):
            return
        self.restarting = error
        self._restarted = anyio.Event()
        assert self._task_group is not None
        self._task_group.start_soon(self._restart, executor, name="asyncpp-stage-restart")

    def _spend_restart(self, error: BaseException) -> bool:
        """Counts one restart against the window; False (and the engine dead for good) when
        none is left."""
        now, window, most = time.monotonic(), self.config.stage_restart_window_s, self.config.max_stage_restarts
        while self._restarts and now - self._restarts[0] > window:
            self._restarts.popleft()
        if len(self._restarts) >= most:
            self._die(EngineDeadError(f"{error} (not restarted: {len(self._restarts)} stage restart(s) in the last "
                                      f"{window:g} s, --max-stage-restarts {most})", permanent=True))
            return False
        self._restarts.append(now)
        return True

    def _die(self, error: EngineDeadError) -> None:
        self.dead = error
        log.error("engine failed for good: %s", error)

    async def _restart(self, failed: Executor) -> None:
        """New stages until some start: a stage that dies while they start is one more
        failure, tried again while the window has restarts left."""
        try:
            await failed.shutdown()  # nothing of the failed generation is left after this
            while True:
                log.error("pipeline failed: %s; restarting the stages (%d of at most %d in %g s)", self.restarting,
                          len(self._restarts), self.config.max_stage_restarts, self.config.stage_restart_window_s)
                started = time.monotonic()
                try:
                    self.executor = await self._fresh_executor()
                except Exception as exc:
                    if not self._spend_restart(exc):
                        return
                    self.restarting = exc
                    continue
                log.info("pipeline stages restarted in %.1f s", time.monotonic() - started)
                return
        finally:
            self.restarting = None
            self._restarted.set()

    async def _fresh_executor(self) -> Executor:
        fresh = create_executor(self.config, self.runner_factory)
        try:
            assert self._task_group is not None
            await fresh.start(self._task_group)
            await fresh.init_kv_cache(self._blocks_per_ve)
        except BaseException:
            await fresh.shutdown()
            raise
        fresh.on_dead = self._on_dead
        return fresh

    # -- live moves (engine/live_move.py) ------------------------------------------------
    async def reshape(self, config: EngineConfig) -> int:
        """Serve `config`'s split on the running stages (nothing in flight); how many ranks
        built new layers. Raises, the old split serving, when it cannot (Executor.reshape)."""
        executor = self.executor
        if executor is None or self.error() is not None or self._closing:
            raise RuntimeError("the pipeline is not serving")
        rebuilt = await executor.reshape(config, self._blocks_per_ve)
        self.config = config  # a restart from now on starts this split
        return rebuilt

    async def recovered(self, failed: Executor) -> bool:
        """After `failed` raised EngineDeadError: wait for its restart; False when the
        engine is down for good (or shutting down)."""
        while self.restarting is not None:
            await self._restarted.wait()
        return self.dead is None and self.executor is not failed

    async def shutdown(self) -> None:
        self._closing = True  # a live move in progress keeps the stages it serves from
        if self.executor is not None:
            await self.executor.shutdown()
