"""The parts of multi-node placement that need no cluster: stage order over nodes, the node
watch, the interface of an address, who is blamed for a lost node, --ray-address, hop times."""
from __future__ import annotations

import socket

import pytest

from asyncpp.core.errors import NodeLostError, StageDiedError
from asyncpp.core.messages import LinkTimes
from asyncpp.core.placement import Node
from asyncpp.engine_args import EngineArgs
from asyncpp.executor.failures import Death, RootCause
from asyncpp.executor.ray_cluster import NodeWatch, RayNode, _stage_order
from asyncpp.executor.stats import HopClock
from asyncpp.executor.supervisor import Supervisor
from asyncpp.testing import two_hosts
from asyncpp.worker.net import bind_collectives_to, interface_of
from helpers.driver import engine_config


def test_stages_start_on_the_driver_node_and_stay_grouped_by_node():
    on_node = {0: "b", 1: "a", 2: "b", 3: "a", 4: "c"}
    assert _stage_order(on_node, driver_node="a") == [1, 3, 0, 2, 4]
    assert _stage_order(on_node, driver_node="elsewhere") == [0, 2, 1, 3, 4]


def _node(port: int) -> RayNode:
    return RayNode(Node("n1", "127.0.0.1"), port)


def test_node_watch_sees_a_listening_raylet_alive_and_a_refusing_one_lost():
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        alive = NodeWatch([_node(port)], interval_s=0.0)
        assert alive.check() == set() and alive.check() == set()
    refusing = NodeWatch([_node(port)], interval_s=0.0)  # closed now: refused
    assert refusing.check() == {"n1"}
    assert refusing.check() == set()  # reported once
    assert refusing.unreachable("n1")


def test_interface_of_an_address(monkeypatch):
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.77") is None  # TEST-NET-3: owned by no interface here
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.setenv(var, "")  # recorded, so the teardown restores what was there (bind sets both)
        monkeypatch.delenv(var)
    assert bind_collectives_to("127.0.0.1") == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth-user")  # the user's choice wins
    assert bind_collectives_to("127.0.0.1") == "eth-user"


def test_a_lost_node_is_blamed_with_stage_and_node(llama_dir):
    stages = engine_config(llama_dir, 2).stages
    error = RootCause(stages).verdict([Death(1, node="10.0.0.2 (node ab12)", node_lost=True)])
    assert isinstance(error, NodeLostError)
    assert "stage 1" in str(error) and "10.0.0.2" in str(error) and "lost" in str(error)
    died = RootCause(stages).verdict([Death(1, node="10.0.0.2 (node ab12)")])
    assert type(died) is StageDiedError and "Ray actor on node 10.0.0.2" in str(died)


def test_a_lost_node_ends_the_engine_without_a_restart(llama_dir):
    supervisor = Supervisor(engine_config(llama_dir, 2), runner_factory=None)  # type: ignore[arg-type]
    executor = object()
    supervisor.executor = executor  # type: ignore[assignment]
    supervisor._on_dead(executor, NodeLostError(1, 1, "10.0.0.2 (node ab12)"))  # type: ignore[arg-type]
    assert supervisor.restarting is None
    assert "not restarted" in str(supervisor.error()) and "10.0.0.2" in str(supervisor.error())


def test_ray_address_needs_the_ray_backend_and_defaults_to_the_environment(llama_dir, monkeypatch):
    with pytest.raises(ValueError, match="distributed_executor_backend='ray'"):
        EngineArgs(ray_address="10.0.0.1:6379", pipeline_parallel_size=2)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert engine_config(llama_dir, 2, distributed_executor_backend="ray").ray_address == "10.0.0.1:6379"
    given = engine_config(llama_dir, 2, distributed_executor_backend="ray", ray_address="10.0.0.9:1")
    assert given.ray_address == "10.0.0.9:1"


def test_hop_time_is_the_wait_once_both_ends_are_at_the_link():
    clock = HopClock(senders=[0, 1])
    clock.record({0: LinkTimes(send_start=10.0), 1: LinkTimes(recv_start=9.0, recv_done=10.5)})  # receiver early
    clock.record({0: LinkTimes(send_start=20.0), 1: LinkTimes(recv_start=21.0, recv_done=21.25)})  # receiver late
    assert clock.snapshot() == [[0.5, 0.25]]


def test_namespace_hosts_are_skipped_with_a_reason_without_root(monkeypatch):
    monkeypatch.setattr(two_hosts.os, "geteuid", lambda: 1000)
    assert "needs root" in two_hosts.unavailable_reason()
