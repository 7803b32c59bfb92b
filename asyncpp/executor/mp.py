"""`mp` transport: one spawned process per rank on this machine, two pipes each.

Each message is pickled once and written to every rank's control pipe; replies come back
on each rank's results pipe. `poll` waits on every results pipe and every process
sentinel together, so a dead rank is noticed as fast as a result is.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess

from asyncpp.core.config import EngineConfig
from asyncpp.core.messages import FromRank, Stop, ToRank
from asyncpp.executor.failures import Death
from asyncpp.executor.transport import Polled, Transport
from asyncpp.worker.process import run_stage
from asyncpp.worker.worker import RunnerFactory, WorkerArgs, default_runner_factory
from asyncpp.worker.world import local_init_method

# libgomp's idle threads spin 300,000 rounds after each parallel region by default (its manual),
# on the core that the next stage needs when a microbatch runs alone on every core
# (MicroBatch.threads); a third of that still spans the gaps between one step's regions. One
# stream at P=2 on 2 cores: 52-59 ms a token with the default, 46-48 with this (single runs).
SOLO_SPIN_COUNT = "100000"


@contextmanager
def _spin_briefly(config: EngineConfig) -> Iterator[None]:
    """The ranks spawned inside inherit a shorter GOMP_SPINCOUNT (unless the user set one)."""
    if not config.solo_threads or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        yield
        return
    os.environ["GOMP_SPINCOUNT"] = SOLO_SPIN_COUNT
    try:
        yield
    finally:
        del os.environ["GOMP_SPINCOUNT"]


@dataclass(slots=True)
class _Rank:
    process: BaseProcess
    control: Connection  # engine -> rank
    results: Connection  # rank -> engine
    open: bool = True  # results not yet at EOF
    exited: bool = False  # its exit was seen (reading exitcode reaps, so we keep our own)


class MultiprocTransport(Transport):
    def __init__(self, config: EngineConfig, runner_factory: RunnerFactory = default_runner_factory):
        self.config = config
        self.runner_factory = runner_factory
        self._ranks: list[_Rank] = []
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)
        self._poll_lock = threading.Lock()  # held while `poll` touches the pipes
        self._reap_lock = threading.Lock()  # one reaper at a time: two waitpids lose an exit code

    async def start(self) -> None:
        # Spawned from the event loop's thread: PDEATHSIG fires when the spawning thread exits.
        ctx = mp.get_context("spawn")
        init_method = local_init_method()
        with _spin_briefly(self.config):
            self._spawn(ctx, init_method)

    def _spawn(self, ctx: SpawnContext, init_method: str) -> None:
        for rank in range(self.config.world_size):
            control_r, control_w = ctx.Pipe(duplex=False)
            results_r, results_w = ctx.Pipe(duplex=False)
            args = WorkerArgs(self.config, rank, init_method, self.runner_factory)
            proc = ctx.Process(target=run_stage, args=(args, os.getpid(), control_r, results_w),
                               name=f"asyncpp-stage{self.config.stage(rank).pp_rank}-rank{rank}", daemon=True)
            proc.start()
            control_r.close()  # the child holds its own copies; ours would mask EOF
            results_w.close()
            self._ranks.append(_Rank(proc, control_w, results_r))

    def send(self, msg: ToRank) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for r in self._ranks:
            try:
                r.control.send_bytes(data)
            except OSError:
                pass  # that rank is gone; poll reports which one and why

    def poll(self, timeout: float | None) -> Polled:
        with self._poll_lock:
            if self._wake_r.closed:
                return Polled()
            handles: list[Connection | int] = [r.results for r in self._ranks if r.open]
            handles += [r.process.sentinel for r in self._ranks if not r.exited]
            ready = set(wait([*handles, self._wake_r], timeout))
            messages = [m for r in self._ranks if r.open and r.results in ready for m in _drain(r)]
            return Polled(messages, self._deaths(ready))

    def _deaths(self, ready: set) -> list[Death]:
        deaths = []
        for rank, r in enumerate(self._ranks):
            if not r.exited and (r.process.sentinel in ready or not r.open):
                with self._reap_lock:
                    r.process.join(1.0)  # EOF comes a moment before the exit code
                if r.process.exitcode is not None:
                    r.exited = True
                    deaths.append(Death(rank, r.process.exitcode))
        return deaths

    def stop(self, grace_s: float) -> None:
        self.send(Stop())
        self._reap(grace_s)
        self._wake_w.send_bytes(b"")
        with self._poll_lock:  # poll has let go of the pipes and will not take them again
            for r in self._ranks:
                r.control.close()
                r.results.close()
            self._wake_r.close()
            self._wake_w.close()

    def kill(self) -> None:
        self._reap(0.0, ("kill",))

    def _reap(self, grace_s: float, stops: tuple[str, ...] = ("terminate", "kill")) -> None:
        """Join every rank within `grace_s`, then terminate and kill the rest."""
        with self._reap_lock:
            end = time.monotonic() + grace_s
            for r in self._ranks:
                r.process.join(max(0.0, end - time.monotonic()))
            for stop in stops:
                for r in self._ranks:
                    if r.process.exitcode is None:
                        getattr(r.process, stop)()
                        r.process.join(2.0 if stop == "terminate" else None)

    def pids(self) -> list[int]:
        return [r.process.pid for r in self._ranks if r.process.pid is not None]


def _drain(r: _Rank) -> list[FromRank]:
    messages = []
    try:
        while r.results.poll():
            messages.append(pickle.loads(r.results.recv_bytes()))
    except (EOFError, OSError):
        r.open = False
    return messages
