"""The pipeline driver: virtual engines submit microbatches and await sampled tokens.

It does not schedule. It numbers microbatches, sends each to every rank through the
transport, and resolves submissions in order: stages run microbatches in submission
order, so the sampling rank's results come back in that order. It keeps the busy and
bubble accounting, decides which rank broke the pipeline, fails every waiter then, and
shuts the ranks down. Backends (uni, mp, ray) are transports behind it.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import anyio
from anyio.abc import TaskGroup

from asyncpp.core.config import EngineConfig
from asyncpp.core.errors import EngineDeadError, MicrobatchError, StageHungError
from asyncpp.core.messages import Failure, FromRank, InitKv, KvReady, LinkTimes, Ready, Reshape, Reshaped, Result, Run
from asyncpp.core.microbatch import MicroBatch, StepOutput
from asyncpp.core.placement import RankPlacement
from asyncpp.executor.failures import RootCause
from asyncpp.executor.stats import HopClock, InFlightClock, PipelineStats
from asyncpp.executor.transport import Transport

_STOP_GRACE_S = 10.0
_WATCHDOG_TICK_S = 1.0


@dataclass(slots=True)
class _Waiter:
    mb_id: int
    event: anyio.Event = field(default_factory=anyio.Event)
    output: StepOutput | None = None
    error: BaseException | None = None
    reported: set[int] = field(default_factory=set)  # ranks whose Result came
    failure: Failure | None = None  # the first rank on which this microbatch raised
    links: dict[int, LinkTimes] = field(default_factory=dict)  # rank -> its stage link's times


@dataclass(slots=True)
class _Replies:
    """Every rank's answer to one broadcast (start: Ready, InitKv: KvReady, Reshape: Reshaped)."""
    expected: int
    by_rank: dict[int, FromRank] = field(default_factory=dict)
    done: anyio.Event = field(default_factory=anyio.Event)

    def add(self, msg: Ready | KvReady | Reshaped) -> None:
        self.by_rank[msg.rank] = msg
        if len(self.by_rank) == self.expected:
            self.done.set()


class Executor:
    def __init__(self, config: EngineConfig, transport: Transport):
        self.config = config
        self.transport = transport
        self._world = config.world_size
        self._sampling_rank = next(s.rank for s in config.stages if s.is_last and s.tp_rank == 0)
        self._pending: deque[_Waiter] = deque()  # oldest first: every rank answers in this order
        self._last_progress = time.monotonic()  # for the watchdog: the last answer while work was pending
        self._replies = _Replies(self._world)
        self._ready: list[Ready] = []
        self._busy = [0.0] * self._world
        self._clock = InFlightClock()
        self._hops = HopClock([s.rank for s in config.stages if s.tp_rank == 0])
        self._next_mb_id = 0
        self._solo: anyio.Event | None = None  # set when the microbatch alone on every core is back
        self._blame = RootCause(config.stages)
        self._gone: set[int] = set()  # ranks seen dead
        self._dead: BaseException | None = None  # what killed the pipeline
        self._closing = False
        self._closed = anyio.Event()
        self._poll_limiter = anyio.CapacityLimiter(1)
        # Told when the pipeline fails (not on shutdown): the engine restarts the stages.
        self.on_dead: Callable[[Executor, BaseException], None] | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, task_group: TaskGroup) -> None:
        """Start the ranks and load the model; the reader task goes into `task_group`."""
        await self.transport.start()
        task_group.start_soon(self._read_loop, name="asyncpp-executor-reader")
        self._ready = await self._await_replies()

    async def init_kv_cache(self, blocks_per_ve: int) -> None:
        """Allocate each rank's physical KV cache: one region of `blocks_per_ve` per VE."""
        await self._broadcast(InitKv(self.config.num_virtual_engines, blocks_per_ve))

    async def reshape(self, config: EngineConfig, blocks_per_ve: int) -> int:
        """Serve `config`'s split with the same ranks (a live move; nothing may be in flight).
        Returns how many ranks built new layers. When one cannot, every rank goes back to the
        old split and this raises RuntimeError naming why; when even that fails, the pipeline
        fails as after a stage death (the restart path brings the old split back)."""
        assert not self._pending, "a live move needs a drained pipeline"
        old = self.config
        replies = await self._broadcast(Reshape(config, blocks_per_ve))
        errors = [f"rank {r.rank}: {r.error}" for r in replies if r.error]
        if not errors:
            self._adopt(config, replies)
            return sum(r.rebuilt for r in replies)
        back = await self._broadcast(Reshape(old, blocks_per_ve))
        if any(r.error for r in back):
            self._dead = EngineDeadError(f"a stage could not return to the split {old.layer_partition} after a "
                                         f"failed move: {'; '.join(r.error for r in back if r.error)}")
            await self._fail()
            raise self._dead
        self._adopt(old, back)
        raise RuntimeError("; ".join(errors))

    async def _broadcast(self, msg: InitKv | Reshape) -> list:
        """Send `msg` to every rank; their answers, by rank."""
        self._raise_if_unusable()
        self._replies = _Replies(self._world)
        self.transport.send(msg)
        return await self._await_replies()

    def _adopt(self, config: EngineConfig, replies: list[Reshaped]) -> None:
        self.config = config
        self._ready = [replace(ready, param_bytes=r.param_bytes) for ready, r in zip(self._ready, replies)]

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
        """Run one microbatch through every stage; raises EngineDeadError if a rank died.
        One that brings its own thread count (every stage's cores, MicroBatch.threads) keeps
        them only when it enters an empty pipeline, and then nothing enters until it is back:
        a stage beside it would oversubscribe the cores."""
        while self._solo is not None:
            await self._solo.wait()
        self._raise_if_unusable()
        mb.mb_id, self._next_mb_id = self._next_mb_id, self._next_mb_id + 1
        waiter = _Waiter(mb.mb_id)
        if self._pending:
            mb.threads = 0  # it overlaps another in the stages: each stage on its own cores
        else:
            self._last_progress = time.monotonic()
        solo = self._solo = anyio.Event() if mb.threads else None
        self._pending.append(waiter)
        self._clock.started(sum(s.num_tokens for s in mb.seqs))
        try:
            self.transport.send(Run(mb))
            await waiter.event.wait()
        finally:
            self._clock.finished()
            if solo is not None:
                self._solo = None
                solo.set()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.output is not None
        return waiter.output

    # -- the reader ----------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while not self._closing:
            polled = await anyio.to_thread.run_sync(
                self.transport.poll, self._poll_timeout(), abandon_on_cancel=True, limiter=self._poll_limiter)
            for msg in polled.messages:
                self._dispatch(msg)
            if self._closing:
                return
            self._gone.update(d.rank for d in polled.deaths)
            self._dead = self._blame.verdict(polled.deaths, final=len(self._gone) == self._world) or self._hung()
            if self._dead is not None:
                await self._fail()
                return

    def _poll_timeout(self) -> float | None:
        waits = [w for w in (self._blame.wait_s(), _WATCHDOG_TICK_S if self._pending else None) if w is not None]
        return min(waits) if waits else None

    def _hung(self) -> StageHungError | None:
        """The watchdog: work pending and no rank answered for --stage-timeout seconds.
        Stages run microbatches in order, so the oldest one is stuck at the first rank that
        has not answered it."""
        timeout = self.config.stage_timeout_s
        if not self._pending or timeout <= 0 or time.monotonic() - self._last_progress < timeout:
            return None
        rank = min(set(range(self._world)) - self._pending[0].reported)
        return StageHungError(self.config.stage(rank).pp_rank, rank, timeout)

    def _dispatch(self, msg: FromRank) -> None:
        match msg:
            case Result():
                self._on_result(msg)
            case Ready() | KvReady() | Reshaped():
                self._replies.add(msg)
            case Failure():
                self._blame.reported(msg)

    def _on_result(self, result: Result) -> None:
        self._busy[result.rank] = result.busy_s
        self._last_progress = time.monotonic()
        waiter = next(w for w in self._pending if result.rank not in w.reported)
        assert waiter.mb_id == result.mb_id, f"result for microbatch {result.mb_id}, expected {waiter.mb_id}"
        waiter.reported.add(result.rank)
        if result.error is not None and waiter.failure is None:
            waiter.failure = result.error
        if result.rank == self._sampling_rank:
            waiter.output = result.output
        if result.link is not None:
            waiter.links[result.rank] = result.link
        if len(waiter.reported) == self._world:  # the oldest: every rank answers in order
            assert self._pending.popleft() is waiter
            self._hops.record(waiter.links)
            if waiter.failure is not None:
                f = waiter.failure
                waiter.error = MicrobatchError(self.config.stage(f.rank).pp_rank, f.rank, f.summary, f.text)
            waiter.event.set()

    async def _fail(self) -> None:
        """A rank died, raised or hung: fail every waiter now and take the other ranks down."""
        assert self._dead is not None
        if self.on_dead is not None:  # first, so a waiter woken below finds the restart begun
            self.on_dead(self, self._dead)
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

    def placement(self) -> list[RankPlacement]:
        """Where each rank runs and how its stage's input arrives, by rank."""
        return [r.placement for r in self._ready if r.placement is not None]

    def rank_pids(self) -> list[int]:
        """Each rank's process id, by rank (the engine's own for `uni`)."""
        return self.transport.pids()

    def stats(self) -> PipelineStats:
        busy = [self._busy[s.rank] for s in self.config.stages if s.tp_rank == 0]
        clock = self._clock
        return PipelineStats(stage_busy_s=busy, active_s=clock.total(), microbatches=clock.count, tokens=clock.tokens,
                             in_flight_mean=clock.mean(), in_flight_max=clock.most, hop_s=self._hops.snapshot())
