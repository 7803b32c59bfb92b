"""`uni` transport: the whole model in the engine process (P = T = 1).

The rank is a thread running the same message loop as a stage process, over two queues,
so the event loop stays free to stream outputs and accept requests while the model runs.
"""
from __future__ import annotations

import os
import queue
import threading

import torch

from asyncpp.core.config import EngineConfig
from asyncpp.core.messages import Failure, FromRank, Stop, ToRank
from asyncpp.executor.failures import Death
from asyncpp.executor.transport import Polled, Transport
from asyncpp.worker.worker import RunnerFactory, WorkerArgs, default_runner_factory, serve


class _Exited:
    """Put on the outbox when the rank's thread ends (or to wake `poll`)."""


class ThreadTransport(Transport):
    def __init__(self, config: EngineConfig, runner_factory: RunnerFactory = default_runner_factory):
        if config.world_size != 1:
            raise ValueError(f"the uni backend runs one rank, the config has {config.world_size}")
        self.config = config
        self.runner_factory = runner_factory
        self._inbox: queue.SimpleQueue[ToRank] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[FromRank | _Exited] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._exited = False

    async def start(self) -> None:
        torch.set_num_threads(self.config.threads_per_rank)
        self._thread = threading.Thread(target=self._run, name="asyncpp-rank0", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            serve(WorkerArgs(self.config, 0, "", self.runner_factory), self._inbox.get, self._outbox.put)
        except BaseException as exc:  # noqa: BLE001 - reported to the engine, which fails every request
            self._outbox.put(Failure.of(0, exc))
        finally:
            self._outbox.put(_Exited())

    def send(self, msg: ToRank) -> None:
        self._inbox.put(msg)

    def poll(self, timeout: float | None) -> Polled:
        if self._exited:
            return Polled()
        polled = Polled()
        try:
            item = self._outbox.get(timeout=timeout)
            while True:
                if isinstance(item, _Exited):
                    self._exited = True
                    polled.deaths.append(Death(0))
                    break
                polled.messages.append(item)
                item = self._outbox.get_nowait()
        except queue.Empty:
            pass
        return polled

    def stop(self, grace_s: float) -> None:
        self._inbox.put(Stop())
        if self._thread is not None:
            self._thread.join()  # a thread cannot be killed: it finishes what is queued first
        self._outbox.put(_Exited())  # wakes a poll still waiting

    def kill(self) -> None:
        self._inbox.put(Stop())  # the thread has raised and is gone, or ends after its current step

    def pids(self) -> list[int]:
        return [os.getpid()]
