"""`mp` backend: one spawned process per rank on this machine.

The engine pickles each microbatch once and writes it to every rank's control pipe;
the last stage's tp-rank-0 answers on its result pipe. Stages run microbatches in
submission order, so results come back in that order and resolve the oldest waiter.
One reader thread waits on every result pipe and every process sentinel together, so a
dead rank is noticed as fast as a result is.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import anyio
from anyio.abc import TaskGroup

from asyncpp.config import EngineConfig
from asyncpp.core.errors import EngineDeadError
from asyncpp.executor.base import Executor, InFlightClock, PipelineStats
from asyncpp.executor.failures import Report, RootCause
from asyncpp.core.microbatch import MicroBatch, StepOutput
from asyncpp.worker.comm import local_init_method
from asyncpp.worker.worker import STOP, RunnerFactory, WorkerArgs, default_runner_factory, run_stage

_STOP_BYTES = pickle.dumps(STOP)
_JOIN_TIMEOUT_S = 10.0
_SETTLE_S = 1.0  # how long a reported exception waits for a silent death to outrank it


@dataclass(slots=True)
class _Rank:
    process: Any  # multiprocessing.context.SpawnProcess
    control: Connection  # engine -> rank
    results: Connection  # rank -> engine
    open: bool = True  # results not yet at EOF
    exited: bool = False  # its exit was seen by the reader (reading exitcode reaps, so we keep our own)


@dataclass(slots=True)
class _Waiter:
    mb_id: int
    event: anyio.Event = field(default_factory=anyio.Event)
    output: StepOutput | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Replies:
    """Answers of every rank to one control message (start, init_kv)."""
    expected: int
    by_rank: dict[int, tuple] = field(default_factory=dict)
    done: anyio.Event = field(default_factory=anyio.Event)


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, runner_factory: RunnerFactory = default_runner_factory):
        super().__init__(config)
        self._runner_factory = runner_factory
        self._world = len(config.stages)
        self._ranks: list[_Rank] = []
        self._busy = mp.get_context("spawn").Array("d", self._world, lock=False)
        self._pending: deque[_Waiter] = deque()
        self._replies: _Replies | None = None
        self._clock = InFlightClock()
        self._next_mb_id = 0
        self._blame = RootCause(config.stages, _SETTLE_S)
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)
        self._poll_lock = threading.Lock()  # held while the reader thread touches the pipes
        self._reap_lock = threading.Lock()
        self._reader_limiter = anyio.CapacityLimiter(1)

    # -- lifecycle ---------------------------------------------------------------
    async def start(self, task_group: TaskGroup) -> None:
        # Spawned from the event-loop thread: PDEATHSIG fires when the spawning thread exits.
        self._spawn_all()
        self._replies = _Replies(self._world)
        task_group.start_soon(self._read_loop, name="asyncpp-mp-reader")
        self._ready = await self._await_replies()

    def _spawn_all(self) -> None:
        ctx = mp.get_context("spawn")
        init_method = local_init_method()
        for rank in range(self._world):
            control_r, control_w = ctx.Pipe(duplex=False)
            results_r, results_w = ctx.Pipe(duplex=False)
            args = WorkerArgs(self.config, rank, init_method, os.getpid(), self._runner_factory)
            proc = ctx.Process(target=run_stage, args=(args, control_r, results_w, self._busy),
                               name=f"asyncpp-stage{self.config.stage(rank).pp_rank}-rank{rank}",
                               daemon=True)
            proc.start()
            control_r.close()  # the child holds its own copies; ours would mask EOF
            results_w.close()
            self._ranks.append(_Rank(proc, control_w, results_r))

    async def _stop(self) -> None:
        self._broadcast(_STOP_BYTES)
        await anyio.to_thread.run_sync(self._reap, _JOIN_TIMEOUT_S)
        self._resolve_all(EngineDeadError("the executor was shut down"))
        await anyio.to_thread.run_sync(self._stop_reader)

    def _reap(self, grace_s: float, stops: tuple[str, ...] = ("terminate", "kill")) -> None:
        """Join every rank within `grace_s`, then terminate and kill the rest.

        Only ever one thread reaps: two threads in waitpid on one child lose its exit code.
        """
        with self._reap_lock:
            end = time.monotonic() + grace_s
            for r in self._ranks:
                r.process.join(max(0.0, end - time.monotonic()))
            for stop in stops:
                for r in self._ranks:
                    if r.process.exitcode is None:
                        getattr(r.process, stop)()
                        r.process.join(2.0 if stop == "terminate" else None)

    def _stop_reader(self) -> None:
        """Wake the reader thread, wait until it has let go of the pipes, close them."""
        self._wake_w.send_bytes(b"")
        with self._poll_lock:
            for r in self._ranks:
                r.control.close()
                r.results.close()
            self._wake_r.close()
            self._wake_w.close()

    # -- model and cache -----------------------------------------------------------
    async def init_kv_cache(self, blocks_per_ve: int) -> None:
        self._raise_if_unusable()
        self._replies = _Replies(self._world)
        self._broadcast(pickle.dumps(("init_kv", self.config.num_virtual_engines, blocks_per_ve)))
        await self._await_replies()

    async def _await_replies(self) -> list[tuple]:
        replies = self._replies
        assert replies is not None
        await replies.done.wait()
        self._raise_if_unusable()
        return [replies.by_rank[r] for r in range(self._world)]

    # -- microbatches --------------------------------------------------------------
    async def submit(self, mb: MicroBatch) -> StepOutput:
        self._raise_if_unusable()
        mb.mb_id, self._next_mb_id = self._next_mb_id, self._next_mb_id + 1
        waiter = _Waiter(mb.mb_id)
        self._pending.append(waiter)
        self._clock.started()
        try:
            self._broadcast(pickle.dumps(("run", mb), protocol=pickle.HIGHEST_PROTOCOL))
            await waiter.event.wait()
        finally:
            self._clock.finished()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.output is not None
        return waiter.output

    def _broadcast(self, data: bytes) -> None:
        for r in self._ranks:
            try:
                r.control.send_bytes(data)
            except OSError:
                pass  # that rank is gone; the reader reports which one and why

    # -- reader --------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while not self._closing:
            messages, died = await anyio.to_thread.run_sync(
                self._poll, self._blame.wait_s(), abandon_on_cancel=True, limiter=self._reader_limiter)
            for msg in messages:
                self._dispatch(msg)
            if self._closing:
                return
            self._dead = self._blame.verdict(died)
            if self._dead is not None:
                await self._fail()
                return

    def _poll(self, timeout: float | None) -> tuple[list[tuple], list[tuple[int, int | None]]]:
        """Block until a rank answers or exits (or `timeout`); runs in the reader thread."""
        with self._poll_lock:
            if self._wake_r.closed:
                return [], []
            handles = [r.results for r in self._ranks if r.open]
            handles += [r.process.sentinel for r in self._ranks if not r.exited]
            ready = set(wait(handles + [self._wake_r], timeout))
            messages = [m for r in self._ranks if r.open and r.results in ready for m in self._drain(r)]
            died = []
            for rank, r in enumerate(self._ranks):
                if not r.exited and (r.process.sentinel in ready or not r.open):
                    with self._reap_lock:
                        r.process.join(1.0)  # EOF comes a moment before the exit code
                    if r.process.exitcode is not None:
                        r.exited = True
                        died.append((rank, r.process.exitcode))
            return messages, died

    @staticmethod
    def _drain(r: _Rank) -> list[tuple]:
        messages = []
        try:
            while r.results.poll():
                messages.append(pickle.loads(r.results.recv_bytes()))
        except (EOFError, OSError):
            r.open = False
        return messages

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "result":
            waiter = self._pending.popleft()
            assert waiter.mb_id == msg[1], f"result for microbatch {msg[1]}, expected {waiter.mb_id}"
            waiter.output = msg[2]
            waiter.event.set()
        elif kind in ("ready", "ok"):
            replies = self._replies
            assert replies is not None
            replies.by_rank[msg[1]] = msg
            if len(replies.by_rank) == replies.expected:
                replies.done.set()
        elif kind == "error":
            self._blame.reported(msg[1], Report(*msg[2:]))

    async def _fail(self) -> None:
        """A rank died or raised: fail every waiter now and take the other ranks down."""
        assert self._dead is not None
        self._resolve_all(self._dead)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._reap, 0.0, ("kill",))

    def _resolve_all(self, error: BaseException) -> None:
        while self._pending:
            waiter = self._pending.popleft()
            waiter.error = error
            waiter.event.set()
        if self._replies is not None and not self._replies.done.is_set():
            self._replies.done.set()

    def stats(self) -> PipelineStats:
        busy = [self._busy[s.rank] for s in self.config.stages if s.tp_rank == 0]
        return PipelineStats(stage_busy_s=busy, active_s=self._clock.total(),
                             microbatches=self._clock.count)
