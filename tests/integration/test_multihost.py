"""Two hosts (network namespaces joined by a veth pair), a Ray head on one and a worker
on the other, and asyncpp at P=2 with one stage on each: greedy parity with transformers,
the placement and the stage link as the engine reports them, then the second host's
processes killed while requests stream. Needs root; CI runs as root."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from asyncpp.testing.two_hosts import RayCluster, ray_on_two_hosts, unavailable_reason
from helpers.parity import hf_greedy, mixed_prompts

pytestmark = [pytest.mark.multihost, pytest.mark.slow]

DRIVER = Path(__file__).resolve().parents[1] / "helpers" / "multihost_driver.py"
MAX_TOKENS = 8
FAIL_WITHIN_S = 10.0
DRIVER_LIMIT_S = 240.0  # the driver bounds its own waits; this bounds the driver


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multihost: {reason}")
    pytest.importorskip("ray")
    with ray_on_two_hosts() as c:
        yield c


def run_driver(cluster: RayCluster, model: Path, prompts: list[list[int]], tmp: Path) -> tuple[dict, float]:
    """Start the driver in host A, kill host B's processes when it says KILL; returns its
    report and when the kill happened (time.time())."""
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    cmd = cluster.head.cmd(sys.executable, str(DRIVER), "--model", str(model), "--ray-address", cluster.address,
                           "--prompts", str(tmp / "prompts.json"), "--out", str(tmp / "report.json"),
                           "--max-tokens", str(MAX_TOKENS))
    killed_at = 0.0
    with open(tmp / "driver.log", "w") as log:
        driver = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=log, text=True)
        watchdog = threading.Timer(DRIVER_LIMIT_S, driver.kill)  # ends the read loop below if it hangs
        watchdog.start()
        try:
            for line in driver.stdout:
                if line.strip() == "KILL":
                    killed_at = time.time()  # before the signals: the 10 s count from the first
                    cluster.worker.signal_all(signal.SIGKILL)
            driver.wait()
        finally:
            watchdog.cancel()
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, (tmp / "driver.log").read_text()[-4000:]
    return json.loads((tmp / "report.json").read_text()), killed_at


def settled(read, limit_s: float = 10.0):
    """`read()` once it returns something empty, or its last value after `limit_s` (Ray ends a
    killed actor's process a moment after ray.kill returns)."""
    deadline = time.monotonic() + limit_s
    while (value := read()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def stage_actors(host) -> list[int]:
    """Processes of `host` that are asyncpp rank actors."""
    found = []
    for pid in host.pids():
        try:
            if b"StageActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def test_two_hosts_parity_placement_and_node_loss(cluster, llama_dir, tmp_path):
    prompts = mixed_prompts(count=4, lo=3, hi=40)
    report, killed_at = run_driver(cluster, llama_dir, prompts, tmp_path)

    assert report["tokens"] == hf_greedy(llama_dir, prompts, MAX_TOKENS)

    first, second = report["placement"]  # by rank: stage 0, then stage 1
    assert (first["stage"], second["stage"]) == (0, 1)
    assert first["node"]["ip"] == cluster.head.ip and second["node"]["ip"] == cluster.worker.ip
    assert first["node"]["node_id"] != second["node"]["node_id"]
    assert second["link_in"] == "gloo"  # across hosts: not the shared-memory ring
    assert (first["interface"], second["interface"]) == (cluster.head.interface, cluster.worker.interface)

    assert report["health_before"] == 200
    assert killed_at, "the driver never reached its in-flight requests"
    for outcome in report["in_flight"]:
        assert outcome["ended"] == "failed", outcome
        assert outcome["at"] - killed_at < FAIL_WITHIN_S, outcome
        assert "stage 1" in outcome["message"] and cluster.worker.ip in outcome["message"], outcome
    health = report["health_after"]
    assert health["status"] == 503 and cluster.worker.ip in health["body"], health
    assert "not restarted" in report["dead_error"]
    assert report["shutdown_s"] < 30

    assert settled(lambda: stage_actors(cluster.head)) == []  # the engine's actors left the surviving host
    assert settled(cluster.worker.pids) == []
    cluster.stop()
    assert cluster.head.pids() == [] and cluster.worker.pids() == []
