"""The cluster side of the `ray` backend: joining a Ray cluster (or starting a private
local one), placing the stages with a placement group, and watching their nodes.

Placement as vLLM does it: one bundle per stage holding its T ranks (a bundle never spans
nodes, so a stage's TP group shares a machine), the first on the driver's node when that
node can hold a stage at all, packed onto as few nodes as fit, and stages numbered from
the driver's node onwards, so consecutive stages share a node whenever they can and their
link stays in shared memory.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from asyncpp.core.config import EngineConfig
from asyncpp.core.placement import Node

log = logging.getLogger("asyncpp")

PLACEMENT_TIMEOUT_S = 120.0


def import_ray() -> Any:
    try:
        import ray  # optional dependency: only this backend needs it
    except ImportError as exc:
        raise ImportError("distributed_executor_backend='ray' needs Ray: pip install 'asyncpp[ray]' "
                          "(or pip install ray), or use the 'mp' backend on one machine") from exc
    return ray


def connect(ray: Any, config: EngineConfig) -> bool:
    """Join `config.ray_address`, or start a private local Ray (no dashboard, Ray's token
    authentication left on). True when this call connected, so the engine disconnects."""
    if ray.is_initialized():  # the application's own ray.init(...) decides
        return False
    if config.ray_address:
        ray.init(address=config.ray_address, log_to_driver=False)
        return True
    # "local": never an existing cluster found through Ray's files in the temp folder.
    cpus = max(len(os.sched_getaffinity(0)), config.world_size)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=cpus)
    return True


@dataclass(frozen=True, slots=True)
class RayNode:
    node: Node
    raylet_port: int


@dataclass(slots=True)
class StagePlacement:
    group: Any  # ray.util.placement_group.PlacementGroup
    bundles: list[int]  # stage -> its bundle in the group
    nodes: list[RayNode]  # stage -> the node its bundle is on


def place_stages(ray: Any, config: EngineConfig, timeout_s: float = PLACEMENT_TIMEOUT_S) -> StagePlacement:
    pp, tp = config.stages[-1].pp_size, config.stages[-1].tp_size
    bundle = {"CPU": float(tp), **({"GPU": float(tp)} if config.device == "cuda" else {})}
    bundles = [dict(bundle) for _ in range(pp)]
    driver = ray.get_runtime_context().get_node_id()
    here = next((n for n in ray.nodes() if n["NodeID"] == driver), None)
    if here is not None and all(here["Resources"].get(k, 0.0) >= v for k, v in bundle.items()):
        bundles[0][f"node:{here['NodeManagerAddress']}"] = 0.001  # Ray's resource naming one node
    group = ray.util.placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise RuntimeError(f"the Ray cluster could not place {pp} stage(s) of {bundle} each within {timeout_s:g} s "
                           f"(a stage's {tp} rank(s) need one node; the cluster has {ray.cluster_resources()}): "
                           "add nodes, or lower --pipeline-parallel-size / --tensor-parallel-size")
    on_node = ray.util.placement_group_table(group)["bundles_to_node_id"]
    order = _stage_order(on_node, driver)
    nodes = _ray_nodes(ray)
    return StagePlacement(group, order, [nodes[on_node[b]] for b in order])


def _stage_order(on_node: dict[int, str], driver_node: str) -> list[int]:
    """Bundles grouped by node, the driver's node first, then the nodes as Ray listed them."""
    first_seen = {node: i for i, node in sorted(on_node.items(), reverse=True)}
    return sorted(on_node, key=lambda b: (on_node[b] != driver_node, first_seen[on_node[b]], b))


def _ray_nodes(ray: Any) -> dict[str, RayNode]:
    return {n["NodeID"]: RayNode(Node(n["NodeID"], n["NodeManagerAddress"]), int(n["NodeManagerPort"]))
            for n in ray.nodes() if n.get("Alive")}


@dataclass(slots=True)
class NodeWatch:
    """Notices a lost node sooner than Ray's heartbeats do: its raylet's port refuses a
    connection (the machine is up, Ray on it is gone), or does not answer `max_misses`
    times in a row (the machine is gone)."""
    nodes: list[RayNode]
    interval_s: float = 0.5
    connect_timeout_s: float = 1.0
    max_misses: int = 3
    lost: set[str] = field(default_factory=set)  # node ids
    _misses: dict[str, int] = field(default_factory=dict)
    _last: float = 0.0

    def check(self) -> set[str]:
        """Node ids newly found lost (probes at most every `interval_s`)."""
        if time.monotonic() - self._last < self.interval_s:
            return set()
        self._last = time.monotonic()
        newly = {n.node.node_id for n in self.nodes if n.node.node_id not in self.lost and self._gone(n)}
        self.lost |= newly
        return newly

    def unreachable(self, node_id: str) -> bool:
        """Probe one node now (after its actor was reported dead): is the whole node gone?"""
        node = next(n for n in self.nodes if n.node.node_id == node_id)
        if node_id not in self.lost and self._probe(node) == "refused":
            self.lost.add(node_id)
        return node_id in self.lost

    def _gone(self, node: RayNode) -> bool:
        result = self._probe(node)
        misses = 0 if result == "ok" else self._misses.get(node.node.node_id, 0) + 1
        self._misses[node.node.node_id] = misses
        return result == "refused" or misses >= self.max_misses

    def _probe(self, node: RayNode) -> str:
        try:
            with socket.create_connection((node.node.ip, node.raylet_port), timeout=self.connect_timeout_s):
                return "ok"
        except ConnectionRefusedError:
            return "refused"
        except OSError:  # timed out, unreachable: maybe a passing network fault
            return "silent"
