"""The pipeline driver: virtual engines submit microbatches and await sampled tokens.

It does not schedule. It numbers microbatches, sends each to every rank through the
transport, and resolves submissions in order: stages run microbatches in submission
order, so the sampling rank's results come back in that order. It keeps the busy and
bubble accounting, decides which rank broke the pipeline, fails every waiter then, and
shuts the ranks down. Backends (uni, mp, ray) are transports behind it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from asyncpp.core.config import EngineConfig
from asyncpp.core.errors import EngineDeadError
from asyncpp.core.messages import Failure, FromRank, InitKv, KvReady, Ready, Result, Run
from asyncpp.core.microbatch import MicroBatch, StepOutput
from asyncpp.executor.failures import RootCause
from asyncpp.executor.stats import InFlightClock, PipelineStats
from asyncpp.executor.transport import Transport

_STOP_GRACE_S = 10.0


@dataclass(slots=True)
class _Waiter:
    mb_id: int
    event: anyio.Event = field(default_factory=anyio.Event)
    output: StepOutput | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Replies:
    """Every rank's answer to one broadcast (start: Ready, InitKv: KvReady)."""
    expected: int
    by_rank: dict[int, FromRank] = field(default_factory=dict)
    done: anyio.Event = field(default_factory=anyio.Event)

    def add(self, msg: Ready | KvReady) -> None:
        self.by_rank[msg.rank] = msg
        if len(self.by_rank) == self.expected:
            self.done.set()


class Executor:
    def __init__(self, config: EngineConfig, transport: Transport):
        self.config = config
        self.transport = transport
        self._world = config.world_size
        self._sampling_rank = next(s.rank for s in config.stages if s.is_last and s.tp_rank == 0)
        self._pending: deque[_Waiter] = deque()
        self._replies = _Replies(self._world)
        self._ready: list[Ready] = []
        self._busy = [0.0] * self._world
        self._clock = InFlightClock()
        self._next_mb_id = 0
        self._blame = RootCause(config.stages)
        self._gone: set[int] = set()  # ranks seen dead
        self._dead: BaseException | None = None  # what killed the pipeline
        self._closing = False
        self._closed = anyio.Event()
        self._poll_limiter = anyio.CapacityLimiter(1)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, task_group: TaskGroup) -> None:
        """Start the ranks and load the model; the reader task goes into `task_group`."""
        await self.transport.start()
        task_group.start_soon(self._read_loop, name="asyncpp-executor-reader")
        self._ready = await self._await_replies()

    async def init_kv_cache(self, blocks_per_ve: int) -> None:
        """Allocate each rank's physical KV cache: one region of `blocks_per_ve` per VE."""
        self._raise_if_unusable()
        self._replies = _Replies(self._world)
        self.transport.send(InitKv(self.config.num_virtual_engines, blocks_per_ve))
        await self._await_replies()

    async def _await_replies(self) -> list:
        await self._replies.done.wait()
        self._raise_if_unusable()
        return [self._replies.by_rank[r] for r in range(self._world)]

    async def shutdown(self) -> None:
        """Stop every rank; nothing outlives this call. A second caller waits for the first."""
        if self._closing:
            with anyio.CancelScope(shield=True):
                await self._closed.wait()
            return
        self._closing = True
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self.transport.stop, _STOP_GRACE_S)
                self._resolve_all(EngineDeadError("the executor was shut down"))
            finally:
                self._closed.set()

    # -- microbatches ------------------------------------------------------------------
    async def submit(self, mb: MicroBatch) -> StepOutput:
        """Run one microbatch through every stage; raises EngineDeadError if a rank died."""
        self._raise_if_unusable()
        mb.mb_id, self._next_mb_id = self._next_mb_id, self._next_mb_id + 1
        waiter = _Waiter(mb.mb_id)
        self._pending.append(waiter)
        self._clock.started()
        try:
            self.transport.send(Run(mb))
            await waiter.event.wait()
        finally:
            self._clock.finished()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.output is not None
        return waiter.output

    # -- the reader ----------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while not self._closing:
            polled = await anyio.to_thread.run_sync(
                self.transport.poll, self._blame.wait_s(), abandon_on_cancel=True, limiter=self._poll_limiter)
            for msg in polled.messages:
                self._dispatch(msg)
            if self._closing:
                return
            self._gone.update(d.rank for d in polled.deaths)
            self._dead = self._blame.verdict(polled.deaths, final=len(self._gone) == self._world)
            if self._dead is not None:
                await self._fail()
                return

    def _dispatch(self, msg: FromRank) -> None:
        match msg:
            case Result(rank, mb_id, output, busy_s):
                self._busy[rank] = busy_s
                if rank == self._sampling_rank:
                    waiter = self._pending.popleft()
                    assert waiter.mb_id == mb_id, f"result for microbatch {mb_id}, expected {waiter.mb_id}"
                    waiter.output = output
                    waiter.event.set()
            case Ready() | KvReady():
                self._replies.add(msg)
            case Failure():
                self._blame.reported(msg)

    async def _fail(self) -> None:
        """A rank died or raised: fail every waiter now and take the other ranks down."""
        assert self._dead is not None
        self._resolve_all(self._dead)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.transport.kill)

    def _resolve_all(self, error: BaseException) -> None:
        while self._pending:
            waiter = self._pending.popleft()
            waiter.error = error
            waiter.event.set()
        self._replies.done.set()

    def _raise_if_unusable(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._closing:
            raise EngineDeadError("the executor was shut down")

    # -- what users and tests read ---------------------------------------------------------
    def num_available_blocks(self) -> int:
        """KV blocks every rank can hold (the minimum over ranks), all VEs together."""
        return min(r.num_blocks for r in self._ready)

    def param_bytes(self) -> list[int]:
        """Parameter bytes each rank loaded, by rank."""
        return [r.param_bytes for r in self._ready]

    def rank_pids(self) -> list[int]:
        """Each rank's process id, by rank (the engine's own for `uni`)."""
        return self.transport.pids()

    def dead_error(self) -> BaseException | None:
        """The error that killed the pipeline, or None while healthy."""
        return self._dead

    def stats(self) -> PipelineStats:
        busy = [self._busy[s.rank] for s in self.config.stages if s.tp_rank == 0]
        clock = self._clock
        return PipelineStats(stage_busy_s=busy, active_s=clock.total(), microbatches=clock.count,
                             in_flight_mean=clock.mean(), in_flight_max=clock.most)
