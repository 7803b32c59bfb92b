"""`ray` transport: one Ray actor per rank, on one machine or several.

Each actor holds a StageWorker and answers one call per message with the same replies a
stage process sends. A message is stored once (`ray.put`) and every rank gets a call for
it; an actor runs its calls one at a time in the order they were made, so stages stay
FIFO. `poll` waits on the outstanding calls: a call that fails because its actor died
names the dead rank. While idle it pings every actor once a second, so a death is
noticed without traffic too.

Ray is imported only when this backend is chosen (it is an optional dependency). Without
a running cluster a local one is started (and stopped with the engine); with
`RAY_ADDRESS` or an earlier `ray.init(address=...)` the actors go to that cluster, where
every node needs asyncpp and the model folder at the same path. GPU ranks ask Ray for
one GPU each.
"""
from __future__ import annotations

import os
import threading
from dataclasses import replace
from typing import Any

import torch

from asyncpp.core.config import EngineConfig
from asyncpp.core.messages import Failure, FromRank, Stop, ToRank
from asyncpp.executor.failures import Death
from asyncpp.executor.transport import Polled, Transport
from asyncpp.worker.worker import RunnerFactory, StageWorker, WorkerArgs, default_runner_factory
from asyncpp.worker.world import free_tcp_port

_IDLE_PING_S = 1.0


def import_ray() -> Any:
    try:
        import ray  # optional dependency: only this backend needs it
    except ImportError as exc:
        raise ImportError("distributed_executor_backend='ray' needs Ray: pip install 'asyncpp[ray]' "
                          "(or pip install ray), or use the 'mp' backend on one machine") from exc
    return ray


class StageActor:
    """One rank inside a Ray worker process (made a Ray actor by RayTransport)."""

    def __init__(self, args: WorkerArgs):
        torch.set_num_threads(args.config.threads_per_rank)
        self.args = args
        self.worker: StageWorker | None = None

    def address(self) -> str:
        """Where the world meets: this node, a port free on it (asked of rank 0)."""
        return f"tcp://{import_ray().util.get_node_ip_address()}:{free_tcp_port('')}"

    def start(self, init_method: str) -> FromRank:
        try:
            self.worker = StageWorker(replace(self.args, init_method=init_method))
            return self.worker.ready()
        except Exception as exc:
            return Failure.of(self.args.rank, exc)

    def call(self, msg: ToRank) -> FromRank | None:
        """Exceptions come back as Failure replies, like a stage process's (not as Ray errors)."""
        assert self.worker is not None, "start() answers before any other call"
        try:
            if isinstance(msg, Stop):
                self.worker.close()
                return None
            return self.worker.handle(msg)
        except Exception as exc:
            return Failure.of(self.args.rank, exc)

    def ping(self) -> None:
        return None

    def pid(self) -> int:
        return os.getpid()


class RayTransport(Transport):
    def __init__(self, config: EngineConfig, runner_factory: RunnerFactory = default_runner_factory):
        self.ray = import_ray()
        self.config = config
        self.runner_factory = runner_factory
        self._actors: list[Any] = []
        self._owns_ray = False
        self._outstanding: dict[Any, int] = {}  # ObjectRef -> rank
        self._lock = threading.Lock()  # guards _outstanding (the poll thread and the event loop)
        self._ray_lock = threading.Lock()  # held while `poll` is inside Ray
        self._stopped = False

    async def start(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
            self._owns_ray = True
        actor_cls = ray.remote(StageActor)
        gpus = 1 if self.config.device == "cuda" else 0
        self._actors = [actor_cls.options(num_cpus=0, num_gpus=gpus, max_concurrency=1).remote(
            WorkerArgs(self.config, rank, "", self.runner_factory)) for rank in range(self.config.world_size)]
        init_method = ray.get(self._actors[0].address.remote())
        self._track([a.start.remote(init_method) for a in self._actors])

    def send(self, msg: ToRank) -> None:
        stored = self.ray.put(msg)  # serialized once, fetched by every rank
        self._track([a.call.remote(stored) for a in self._actors])

    def _track(self, refs: list[Any]) -> None:
        with self._lock:
            self._outstanding.update((ref, rank) for rank, ref in enumerate(refs))

    def poll(self, timeout: float | None) -> Polled:
        with self._ray_lock:
            if self._stopped:
                return Polled()
            return self._collect(_IDLE_PING_S if timeout is None else min(timeout, _IDLE_PING_S))

    def _collect(self, wait_s: float) -> Polled:
        with self._lock:
            if not self._outstanding:
                self._outstanding.update((a.ping.remote(), r) for r, a in enumerate(self._actors))
            refs = list(self._outstanding)
        done, _ = self.ray.wait(refs, num_returns=1, timeout=wait_s)
        if done:
            done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        polled = Polled()
        for ref in done:
            with self._lock:
                rank = self._outstanding.pop(ref)
            try:
                reply = self.ray.get(ref)
            except self.ray.exceptions.RayActorError:
                polled.deaths.append(Death(rank))
                continue
            except self.ray.exceptions.RayError as exc:  # e.g. a reply that fails to unpickle
                reply = Failure.of(rank, exc)
            if reply is not None:
                polled.messages.append(reply)
        return polled

    def stop(self, grace_s: float) -> None:
        if self._actors:
            refs = [a.call.remote(Stop()) for a in self._actors]
            self.ray.wait(refs, num_returns=len(refs), timeout=grace_s)
        self.kill()
        with self._ray_lock:  # poll is out of Ray and stays out
            self._stopped = True
        if self._owns_ray:
            self.ray.shutdown()
            self._owns_ray = False

    def kill(self) -> None:
        for actor in self._actors:
            self.ray.kill(actor, no_restart=True)

    def pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self._actors])
