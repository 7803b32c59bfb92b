"""`uni` backend: the whole model in the engine process (P = T = 1).

Compute runs in a worker thread, one microbatch at a time in submission order, so the
event loop stays free to stream outputs and accept requests while the model runs.
"""
from __future__ import annotations

import time
import traceback
from typing import Any

import anyio
import torch
from anyio.abc import TaskGroup

from asyncpp.config import EngineConfig
from asyncpp.core.errors import EngineDeadError
from asyncpp.executor.base import Executor, InFlightClock, PipelineStats
from asyncpp.core.microbatch import MicroBatch, StepOutput
from asyncpp.worker.worker import RunnerFactory, default_runner_factory


class UniExecutor(Executor):
    def __init__(self, config: EngineConfig, runner_factory: RunnerFactory = default_runner_factory):
        super().__init__(config)
        if len(config.stages) != 1:
            raise ValueError(f"the uni executor runs one rank, the config has {len(config.stages)}")
        self._runner_factory = runner_factory
        self._runner: Any = None
        self._limiter = anyio.CapacityLimiter(1)  # FIFO: microbatches run in submission order
        self._clock = InFlightClock()
        self._busy_s = 0.0

    async def start(self, task_group: TaskGroup) -> None:
        torch.set_num_threads(self.config.threads_per_rank)
        stage = self.config.stage(0)
        self._runner = await anyio.to_thread.run_sync(
            self._runner_factory, self.config, stage, None)

    def num_available_blocks(self) -> int:
        return self._runner.num_available_blocks()

    def param_bytes(self) -> list[int]:
        return [self._runner.param_bytes()]

    async def init_kv_cache(self, blocks_per_ve: int) -> None:
        await anyio.to_thread.run_sync(self._runner.init_kv_cache,
                                       self.config.num_virtual_engines, blocks_per_ve)

    async def submit(self, mb: MicroBatch) -> StepOutput:
        self._raise_if_unusable()
        self._clock.started()
        try:
            return await anyio.to_thread.run_sync(self._execute, mb, limiter=self._limiter)
        finally:
            self._clock.finished()

    def _execute(self, mb: MicroBatch) -> StepOutput:
        self._raise_if_unusable()  # an earlier microbatch may have failed while we queued
        started = time.perf_counter()
        try:
            return self._runner.execute(mb, None)
        except Exception as exc:
            self._dead = EngineDeadError(f"the model raised an exception:\n{traceback.format_exc()}")
            raise self._dead from exc
        finally:
            self._busy_s += time.perf_counter() - started

    async def _stop(self) -> None:
        async with self._limiter:  # let the running microbatch finish before releasing
            self._runner = None

    def stats(self) -> PipelineStats:
        return PipelineStats(stage_busy_s=[self._busy_s], active_s=self._clock.total(),
                             microbatches=self._clock.count)
