"""`ray` transport: one Ray actor per rank, on one machine or several.

Each actor holds a StageWorker and answers one call per message with the same replies a
stage process sends. A message is stored once (`ray.put`) and every rank gets a call for
it; an actor runs its calls one at a time in the order they were made, so stages stay
FIFO. `poll` waits on the outstanding calls: a call that fails because its actor died
names the dead rank and its node. While idle it pings every actor once a second, and it
probes the raylets of the stages' nodes, so a death or a lost node is noticed without
traffic too.

Ray is imported only when this backend is chosen (it is an optional dependency). With
`--ray-address` or `RAY_ADDRESS` (or an earlier `ray.init(address=...)`) the actors go
to that cluster, where every node needs asyncpp and the model folder at the same path;
otherwise a private local Ray is started and stopped with the engine. Placement and node
watching: asyncpp.executor.ray_cluster.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from typing import Any

import anyio
import torch

from asyncpp.core.config import EngineConfig
from asyncpp.core.messages import Failure, FromRank, Stop, ToRank
from asyncpp.core.placement import Node
from asyncpp.executor.failures import Death
from asyncpp.executor.ray_cluster import NodeWatch, RayNode, StagePlacement, connect, import_ray, place_stages
from asyncpp.executor.transport import Polled, Transport
from asyncpp.worker.net import bind_collectives_to
from asyncpp.worker.worker import RunnerFactory, StageWorker, WorkerArgs, default_runner_factory
from asyncpp.worker.world import free_tcp_port

_IDLE_PING_S = 1.0
log = logging.getLogger("asyncpp")


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
            ray = import_ray()
            node = Node(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
            interface = bind_collectives_to(node.ip)
            self.worker = StageWorker(replace(self.args, init_method=init_method, node=node, interface=interface))
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
        self._placement: StagePlacement | None = None
        self._nodes: list[RayNode] = []  # stage -> its node (kept after the placement group is gone)
        self._watch = NodeWatch([])
        self._owns_ray = False
        self._outstanding: dict[Any, int] = {}  # ObjectRef -> rank
        self._dead: set[int] = set()  # ranks reported dead
        self._lock = threading.Lock()  # guards _outstanding (the poll thread and the event loop)
        self._ray_lock = threading.Lock()  # held while `poll` is inside Ray
        self._stopped = False
        self._killed = False

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self._start)  # waits on the cluster: not on the event loop

    def _start(self) -> None:
        ray = self.ray
        self._owns_ray = connect(ray, self.config)
        self._placement = place_stages(ray, self.config)
        self._nodes = self._placement.nodes
        self._watch = NodeWatch(list(dict.fromkeys(self._nodes)))
        for p, node in enumerate(self._nodes):
            log.info("pipeline stage %d (ranks %s) placed on %s", p,
                     [s.rank for s in self.config.stages if s.pp_rank == p], node.node)
        actor_cls = ray.remote(StageActor)
        self._actors = [self._actor(actor_cls, rank) for rank in range(self.config.world_size)]
        init_method = ray.get(self._actors[0].address.remote())
        self._track([a.start.remote(init_method) for a in self._actors])

    def _actor(self, actor_cls: Any, rank: int) -> Any:
        assert self._placement is not None
        stage = self.config.stage(rank).pp_rank
        strategy = self.ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy
        where = strategy(self._placement.group, self._placement.bundles[stage])
        gpus = 1 if self.config.device == "cuda" else 0
        return actor_cls.options(num_cpus=1, num_gpus=gpus, max_concurrency=1, scheduling_strategy=where).remote(
            WorkerArgs(self.config, rank, "", self.runner_factory))

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
            polled = self._collect(_IDLE_PING_S if timeout is None else min(timeout, _IDLE_PING_S))
            polled.deaths += self._lost_ranks(self._watch.check())
            return polled

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
                polled.deaths += self._died(rank)
                continue
            except self.ray.exceptions.RayError as exc:  # e.g. a reply that fails to unpickle
                reply = Failure.of(rank, exc)
            if reply is not None:
                polled.messages.append(reply)
        return polled

    def _died(self, rank: int) -> list[Death]:
        node = self._node_of(rank)
        if self._watch.unreachable(node.node.node_id):
            return self._lost_ranks({node.node.node_id})
        if rank in self._dead:
            return []
        self._dead.add(rank)
        return [Death(rank, node=str(node.node))]

    def _lost_ranks(self, node_ids: set[str]) -> list[Death]:
        """Every rank on these nodes, not reported yet: dead with its node."""
        ranks = [r for r in range(self.config.world_size)
                 if self._node_of(r).node.node_id in node_ids and r not in self._dead]
        self._dead.update(ranks)
        return [Death(r, node=str(self._node_of(r).node), node_lost=True) for r in ranks]

    def _node_of(self, rank: int) -> RayNode:
        return self._nodes[self.config.stage(rank).pp_rank]

    def stop(self, grace_s: float) -> None:
        if self._actors and not self._killed:
            refs = [a.call.remote(Stop()) for a in self._actors]
            self.ray.wait(refs, num_returns=len(refs), timeout=grace_s)
        self.kill()
        with self._ray_lock:  # poll is out of Ray and stays out
            self._stopped = True
        if self._owns_ray:
            self.ray.shutdown()
            self._owns_ray = False

    def kill(self) -> None:
        self._killed = True
        for actor in self._actors:
            self.ray.kill(actor, no_restart=True)
        if self._placement is not None:
            self.ray.util.remove_placement_group(self._placement.group)
            self._placement = None

    def pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self._actors])
