"""`ray` backend: one Ray actor per rank, on one machine or several.

The same stage worker as `mp`, driven by actor calls instead of pipes: each microbatch
is stored once (`ray.put`) and every rank gets a `run` call for it. An actor runs its
calls one at a time in the order they were made, so stages stay FIFO. A watcher thread
waits on the outstanding calls: the last stage's answer resolves a submit, a call that
fails because its actor died names the dead rank. While idle the watcher pings every
actor once a second, so a death is noticed without traffic too.

Ray is imported only when this backend is chosen. Without a running cluster a local one
is started (and stopped with the executor); with `RAY_ADDRESS` or an earlier
`ray.init(address=...)` the actors go to that cluster, where every node needs asyncpp
and the model folder at the same path. GPU ranks ask Ray for one GPU each.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import torch
from anyio.abc import TaskGroup

from asyncpp.config import EngineConfig
from asyncpp.core.errors import EngineDeadError
from asyncpp.executor.base import Executor, InFlightClock, PipelineStats
from asyncpp.executor.failures import Report, RootCause
from asyncpp.core.microbatch import MicroBatch, StepOutput
from asyncpp.worker.comm import close_world, free_tcp_port
from asyncpp.worker.worker import RunnerFactory, StageWorker, WorkerArgs, default_runner_factory, failure_report

_SETTLE_S = 1.0
_IDLE_PING_S = 1.0
_STOP_TIMEOUT_S = 10.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError("distributed_executor_backend='ray' needs Ray: pip install 'asyncpp[ray]' "
                          "(or pip install ray), or use the 'mp' backend on one machine") from exc
    return ray


class StageActor:
    """One rank inside a Ray worker process (made a Ray actor by RayExecutor)."""

    def __init__(self, args: WorkerArgs):
        torch.set_num_threads(args.config.threads_per_rank)
        self.args = args
        self.busy = [0.0] * len(args.config.stages)
        self.worker: StageWorker | None = None

    def address(self) -> str:
        """Where the world meets: this node, a port free on it (asked of rank 0)."""
        import ray
        return f"tcp://{ray.util.get_node_ip_address()}:{free_tcp_port('')}"

    def start(self, init_method: str) -> tuple:
        return self._guard(self._start, init_method)

    def _start(self, init_method: str) -> tuple:
        self.worker = StageWorker(replace(self.args, init_method=init_method), self.busy)
        runner = self.worker.runner
        return ("ready", self.args.rank, runner.param_bytes(), runner.num_available_blocks())

    def init_kv_cache(self, num_virtual_engines: int, blocks_per_ve: int) -> tuple:
        return self._guard(self._init_kv_cache, num_virtual_engines, blocks_per_ve)

    def _init_kv_cache(self, num_virtual_engines: int, blocks_per_ve: int) -> tuple:
        self.worker.init_kv_cache(num_virtual_engines, blocks_per_ve)
        return ("ok", self.args.rank)

    def run(self, mb: MicroBatch) -> tuple:
        return self._guard(self._run, mb)

    def _run(self, mb: MicroBatch) -> tuple:
        out = self.worker.run(mb)
        return ("done", self.args.rank, mb.mb_id, out, self.busy[self.args.rank])

    def ping(self) -> tuple:
        return ("pong", self.args.rank)

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.link.wait_sends()
        close_world()

    def _guard(self, fn, *args) -> tuple:
        """Exceptions come back as reports, like the `mp` workers' (not as Ray errors)."""
        try:
            return fn(*args)
        except Exception as exc:
            return failure_report(self.args.rank, exc)


@dataclass(slots=True)
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    output: StepOutput | None = None
    error: BaseException | None = None


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, runner_factory: RunnerFactory = default_runner_factory):
        super().__init__(config)
        self._ray = import_ray()
        self._runner_factory = runner_factory
        self._world = len(config.stages)
        self._last_rank = next(s.rank for s in config.stages if s.is_last and s.tp_rank == 0)
        self._actors: list[Any] = []
        self._owns_ray = False
        self._busy = [0.0] * self._world
        self._outstanding: dict[Any, int] = {}  # ObjectRef -> rank, shared with the watcher thread
        self._lock = threading.Lock()  # guards _outstanding
        self._wait_lock = threading.Lock()  # held while the watcher thread is inside Ray
        self._stopped = False
        self._waiters: dict[int, _Waiter] = {}  # mb_id -> waiter
        self._clock = InFlightClock()
        self._next_mb_id = 0
        self._blame = RootCause(config.stages, _SETTLE_S)
        self._watcher_limiter = anyio.CapacityLimiter(1)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, task_group: TaskGroup) -> None:
        await anyio.to_thread.run_sync(self._start_actors)
        task_group.start_soon(self._watch, name="asyncpp-ray-watcher")

    def _start_actors(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
            self._owns_ray = True
        actor_cls = ray.remote(StageActor)
        gpus = 1 if self.config.device == "cuda" else 0
        self._actors = [actor_cls.options(num_cpus=0, num_gpus=gpus, max_concurrency=1).remote(
            WorkerArgs(self.config, rank, "", 0, self._runner_factory)) for rank in range(self._world)]
        init_method = ray.get(self._actors[0].address.remote())
        self._ready = self._gather([a.start.remote(init_method) for a in self._actors])

    def _gather(self, refs: list[Any]) -> list[tuple]:
        """Every rank's answer; the first failure kills them all and raises."""
        ray = self._ray
        answers: dict[int, tuple] = {}
        pending = {ref: rank for rank, ref in enumerate(refs)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            rank = pending.pop(done[0])
            answer, died = self._fetch(done[0], rank)
            if died or answer[0] == "error":
                if not died:
                    self._blame.reported(rank, Report(*answer[2:]))
                self._dead = self._blame.verdict([(rank, None)] if died else [], final=True)
                self._kill_actors()
                raise self._dead
            answers[rank] = answer
        return [answers[r] for r in range(self._world)]

    def _fetch(self, ref: Any, rank: int) -> tuple[tuple, bool]:
        """(answer, died): a call on a dead actor raises instead of answering."""
        try:
            return self._ray.get(ref), False
        except self._ray.exceptions.RayActorError:
            return (), True
        except self._ray.exceptions.RayError as exc:  # e.g. an answer that fails to unpickle
            return failure_report(rank, exc), False

    async def _stop(self) -> None:
        await anyio.to_thread.run_sync(self._stop_actors)
        self._resolve_all(EngineDeadError("the executor was shut down"))

    def _stop_actors(self) -> None:
        ray = self._ray
        if self._actors and self._dead is None:
            refs = [a.stop.remote() for a in self._actors]
            ray.wait(refs, num_returns=len(refs), timeout=_STOP_TIMEOUT_S)
        self._kill_actors()
        with self._wait_lock:  # the watcher thread is out of Ray and stays out
            self._stopped = True
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def _kill_actors(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor, no_restart=True)

    # -- model and cache -----------------------------------------------------------------
    async def init_kv_cache(self, blocks_per_ve: int) -> None:
        self._raise_if_unusable()
        v = self.config.num_virtual_engines
        await anyio.to_thread.run_sync(
            self._gather, [a.init_kv_cache.remote(v, blocks_per_ve) for a in self._actors])

    # -- microbatches ----------------------------------------------------------------------
    async def submit(self, mb: MicroBatch) -> StepOutput:
        self._raise_if_unusable()
        mb.mb_id, self._next_mb_id = self._next_mb_id, self._next_mb_id + 1
        waiter = self._waiters[mb.mb_id] = _Waiter()
        stored = self._ray.put(mb)  # serialized once, fetched by every rank
        refs = [a.run.remote(stored) for a in self._actors]
        with self._lock:
            self._outstanding.update((ref, rank) for rank, ref in enumerate(refs))
        self._clock.started()
        try:
            await waiter.event.wait()
        finally:
            self._clock.finished()
            self._waiters.pop(mb.mb_id, None)
        if waiter.error is not None:
            raise waiter.error
        return waiter.output

    # -- watcher ---------------------------------------------------------------------------
    async def _watch(self) -> None:
        while not self._closing:
            answers, died = await anyio.to_thread.run_sync(
                self._wait_some, self._blame.wait_s(), abandon_on_cancel=True,
                limiter=self._watcher_limiter)
            for answer in answers:
                self._dispatch(answer)
            if self._closing:
                return
            self._dead = self._blame.verdict(died)
            if self._dead is not None:
                self._resolve_all(self._dead)
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._kill_actors)
                return

    def _wait_some(self, timeout: float | None) -> tuple[list[tuple], list[tuple[int, None]]]:
        """Answers of the calls that finished (waiting up to a ping interval); runs in a thread."""
        with self._wait_lock:
            if self._stopped:
                return [], []
            return self._collect(timeout)

    def _collect(self, timeout: float | None) -> tuple[list[tuple], list[tuple[int, None]]]:
        with self._lock:
            if not self._outstanding:
                self._outstanding.update((a.ping.remote(), r) for r, a in enumerate(self._actors))
            refs = list(self._outstanding)
        wait_s = _IDLE_PING_S if timeout is None else min(timeout, _IDLE_PING_S)
        done, _ = self._ray.wait(refs, num_returns=1, timeout=wait_s)
        if done:
            done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        answers, died = [], []
        for ref in done:
            with self._lock:
                rank = self._outstanding.pop(ref)
            answer, dead = self._fetch(ref, rank)
            if dead:
                died.append((rank, None))
            else:
                answers.append(answer)
        return answers, died

    def _dispatch(self, answer: tuple) -> None:
        kind, rank = answer[0], answer[1]
        if kind == "done":
            self._busy[rank] = answer[4]
            waiter = self._waiters.get(answer[2])
            if rank == self._last_rank and waiter is not None:
                waiter.output = answer[3]
                waiter.event.set()
        elif kind == "error":
            self._blame.reported(rank, Report(*answer[2:]))

    def _resolve_all(self, error: BaseException) -> None:
        for waiter in self._waiters.values():
            waiter.error = error
            waiter.event.set()

    def stats(self) -> PipelineStats:
        busy = [self._busy[s.rank] for s in self.config.stages if s.tp_rank == 0]
        return PipelineStats(stage_busy_s=busy, active_s=self._clock.total(),
                             microbatches=self._clock.count)
