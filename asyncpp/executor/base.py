"""The executor interface: virtual engines submit microbatches, awaiting sampled tokens.

An executor does not schedule. It moves microbatches through the stages in submission
order (FIFO per stage), keeping up to V in flight, and resolves each submission.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from asyncpp.config import EngineConfig
from asyncpp.core.errors import EngineDeadError
from asyncpp.core.microbatch import MicroBatch, StepOutput


@dataclass(slots=True)
class PipelineStats:
    stage_busy_s: list[float]  # compute seconds per stage since start
    active_s: float  # seconds with at least one microbatch in flight
    microbatches: int = 0

    @property
    def busy_fractions(self) -> list[float]:
        if self.active_s <= 0:
            return [0.0 for _ in self.stage_busy_s]
        return [min(1.0, b / self.active_s) for b in self.stage_busy_s]

    @property
    def bubble_fraction(self) -> float:
        fractions = self.busy_fractions
        return 1.0 - sum(fractions) / len(fractions) if fractions and self.active_s > 0 else 0.0


@dataclass(slots=True)
class InFlightClock:
    """Accumulates the time during which at least one microbatch is in flight."""
    in_flight: int = 0
    active_s: float = 0.0
    since: float = field(default=0.0)
    count: int = 0

    def started(self) -> None:
        if self.in_flight == 0:
            self.since = time.perf_counter()
        self.in_flight += 1
        self.count += 1

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.active_s += time.perf_counter() - self.since

    def total(self) -> float:
        running = time.perf_counter() - self.since if self.in_flight else 0.0
        return self.active_s + running


class Executor(ABC):
    def __init__(self, config: EngineConfig):
        self.config = config
        self._dead: BaseException | None = None  # what killed the executor
        self._closing = False  # shutdown has begun
        self._closed = anyio.Event()  # shutdown has finished
        self._ready: list[tuple] = []  # ranks' ("ready", rank, param_bytes, num_blocks) replies

    @abstractmethod
    async def start(self, task_group: TaskGroup) -> None:
        """Start the ranks and load the model; background tasks go into `task_group`."""

    def num_available_blocks(self) -> int:
        """KV blocks every rank can hold (the minimum over ranks), all VEs together."""
        return min(msg[3] for msg in self._ready)

    @abstractmethod
    async def init_kv_cache(self, blocks_per_ve: int) -> None:
        """Allocate each rank's physical KV cache: one region of `blocks_per_ve` per VE."""

    @abstractmethod
    async def submit(self, mb: MicroBatch) -> StepOutput:
        """Run one microbatch through every stage; raises EngineDeadError if a rank died."""

    async def shutdown(self) -> None:
        """Stop every rank; no process or thread outlives this call. A second caller waits
        for the first one's shutdown to finish."""
        if self._closing:
            with anyio.CancelScope(shield=True):
                await self._closed.wait()
            return
        self._closing = True
        with anyio.CancelScope(shield=True):
            try:
                await self._stop()
            finally:
                self._closed.set()

    @abstractmethod
    async def _stop(self) -> None:
        """Stop the ranks and fail every waiting submission; runs once, shielded."""

    @abstractmethod
    def stats(self) -> PipelineStats: ...

    def param_bytes(self) -> list[int]:
        """Parameter bytes each rank loaded, by rank."""
        return [msg[2] for msg in self._ready]

    def dead_error(self) -> BaseException | None:
        """The error that killed the executor, or None while healthy."""
        return self._dead

    def _raise_if_unusable(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._closing:
            raise EngineDeadError("the executor was shut down")


def create_executor(config: EngineConfig) -> Executor:
    if config.backend == "uni":
        from asyncpp.executor.uni import UniExecutor
        return UniExecutor(config)
    if config.backend == "mp":
        from asyncpp.executor.mp import MultiprocExecutor
        return MultiprocExecutor(config)
    if config.backend == "ray":
        from asyncpp.executor.ray import RayExecutor
        return RayExecutor(config)
    raise ValueError(f"unknown distributed_executor_backend {config.backend!r}")
