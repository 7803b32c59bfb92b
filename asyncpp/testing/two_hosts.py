"""Two hosts on one machine, for the multi-node tests and benchmarks: two network
namespaces joined by a veth pair (traffic only between them), a Ray head in the first
and a Ray worker in the second. Needs root (`ip netns`).

Ray is stopped by signalling the processes of each namespace, never with `ray stop`,
which would stop every Ray process of the machine.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpp
from asyncpp.worker.net import SOCKET_IFNAME_VARS

SUBNET = "10.231.0"
RAY_PORT = 6379  # free in a fresh namespace


def unavailable_reason() -> str | None:
    """Why two namespace hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command"
    probe = f"asyncpp-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass(frozen=True, slots=True)
class Host:
    netns: str
    ip: str
    interface: str  # its end of the veth pair

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def signal_all(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process of this host, SIGKILL what is left after `grace_s`."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.signal_all(signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)

    def tx_bytes(self) -> int:
        """Bytes sent out of its veth end (read inside the namespace)."""
        out = subprocess.run(self.cmd("cat", f"/sys/class/net/{self.interface}/statistics/tx_bytes"),
                             capture_output=True, text=True, check=True).stdout
        return int(out)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Hosts A and B (SUBNET.1 and SUBNET.2), loopback up in each; removed on exit, their
    processes killed."""
    tag = f"{os.getpid() % 100000}"
    a = Host(f"asyncpp-{tag}-a", f"{SUBNET}.1", f"app{tag}a")
    b = Host(f"asyncpp-{tag}-b", f"{SUBNET}.2", f"app{tag}b")
    try:
        for h in (a, b):
            _ip("netns", "add", h.netns)
        _ip("link", "add", a.interface, "netns", a.netns, "type", "veth", "peer", "name", b.interface,
            "netns", b.netns)
        for h in (a, b):
            _ip("-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", h.interface)
            _ip("-n", h.netns, "link", "set", h.interface, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            # Ray finds its own address by routing towards the internet: that must be the veth.
            _ip("-n", h.netns, "route", "add", "default", "dev", h.interface)
        yield a, b
    finally:
        for h in (a, b):
            h.stop_all(grace_s=2.0)
            subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)  # takes the veth pair along


@dataclass(slots=True)
class RayCluster:
    """A Ray head on `head` and a worker on `worker`, `cpus` each (one: a two-stage placement
    needs both nodes), with token authentication."""
    head: Host
    worker: Host
    cpus: int = 1
    env: dict[str, str] = field(default_factory=dict)
    _temp_dirs: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{RAY_PORT}"

    def start(self) -> None:
        repo_root = str(Path(asyncpp.__file__).resolve().parent.parent)  # the asyncpp under test, on every node
        # The hosts' interfaces are the veth ends: an interface the caller's environment names is not there.
        inherited = {k: v for k, v in os.environ.items() if k not in SOCKET_IFNAME_VARS}
        self.env = {**inherited, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PYTHONPATH": repo_root, "RAY_USAGE_STATS_ENABLED": "0"}
        self._node(self.head, "--head", "--port", str(RAY_PORT), "--include-dashboard=false")
        self._node(self.worker, "--address", self.address)

    def _node(self, host: Host, *args: str) -> None:
        temp = tempfile.mkdtemp(prefix="apray")  # short: Ray's socket paths have a length limit
        self._temp_dirs.append(temp)
        ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run(host.cmd(ray, "start", *args, "--node-ip-address", host.ip, "--num-cpus", str(self.cpus),
                                "--num-gpus", "0", "--object-store-memory", str(100 << 20),
                                "--disable-usage-stats", "--temp-dir", temp),
                       env=self.env, check=True, capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        for host in (self.worker, self.head):
            host.stop_all()
        for temp in self._temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


@contextmanager
def ray_on_two_hosts(cpus: int = 1) -> Iterator[RayCluster]:
    with two_hosts() as (a, b):
        cluster = RayCluster(a, b, cpus)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
