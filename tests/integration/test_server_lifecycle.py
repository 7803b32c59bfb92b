"""The server's life: `asyncpp serve` shutting down on Ctrl-C / SIGTERM with no process left
behind, and a dead stage turning /health and new requests into 503s."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from asyncpp.server.app import build_app
from asyncpp.server.threaded import serve_in_thread
from helpers.http_server import COMPLETION_PROMPT, MAX_MODEL_LEN, engine_args
from helpers.processes import alive, descendants

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _healthy(url: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, f"asyncpp serve exited early with {proc.returncode}"
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_shuts_down_on_signal_leaving_no_process(llama_dir, tok_dir, sig):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "asyncpp", "serve", str(llama_dir), "--tokenizer", str(tok_dir),
           "--pipeline-parallel-size", "2", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
           "--kv-cache-memory", "64MiB", "--port", str(port), "--log-level", "info"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_until(lambda: _healthy(url, proc), 180, "the server to become healthy")
        children = descendants(proc.pid)
        assert len(children) >= 2, "two stage processes expected"
        body = {"prompt": COMPLETION_PROMPT, "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as s:
            lines = s.iter_lines()
            next(lines)  # a request is streaming while the signal arrives
            proc.send_signal(sig)
            try:
                for _ in lines:
                    pass
            except httpx.HTTPError:
                pass  # the server may cut the stream when its grace period ends
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130, -sig), output  # 130: Ctrl-C re-raised after a clean shutdown
    assert "Application shutdown complete" in output, output
    _wait_until(lambda: not any(alive(pid) for pid in children), 30, "the stage processes to exit")


@pytest.mark.slow
def test_dead_stage_makes_health_and_requests_503(llama_dir, tok_dir):
    before = {p.pid for p in multiprocessing.active_children()}
    app = build_app(engine_args(llama_dir, tok_dir, distributed_executor_backend="mp"))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        stages = [p for p in multiprocessing.active_children() if p.pid not in before]
        assert stages, "the mp backend runs its stage in a child process"
        os.kill(stages[0].pid, signal.SIGKILL)
        _wait_until(lambda: http.get("/health").status_code == 503, 30, "/health to answer 503")
        health = http.get("/health")
        assert health.headers["retry-after"] and health.json()["error"]["code"] == 503
        refused = http.post("/v1/completions", json={"prompt": COMPLETION_PROMPT})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["type"] == "ServiceUnavailableError"


@pytest.mark.anyio
async def test_sigterm_ends_every_live_stream_with_an_error_event_and_done(llama_dir, tok_dir):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "asyncpp", "serve", str(llama_dir), "--tokenizer", str(tok_dir), "--dtype", "float32",
           "--max-model-len", "1024", "--kv-cache-memory", "64MiB", "--port", str(port), "--log-stats-interval", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    body = {"prompt": COMPLETION_PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    events: dict[int, list[str]] = {}
    try:
        _wait_until(lambda: _healthy(url, proc), 120, "the server to start")
        async with httpx.AsyncClient(base_url=url, timeout=60) as http, anyio.create_task_group() as tg:
            async def stream(i: int, started: anyio.Event) -> None:
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            events.setdefault(i, []).append(line[6:])
                            started.set()

            for i in range(8):
                started = anyio.Event()
                tg.start_soon(stream, i, started)
                await started.wait()
            proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for lines in events.values():
        assert lines[-1] == "[DONE]" and '"choices"' in lines[0], lines[-3:]
        assert json.loads(lines[-2])["error"] == {"message": "the server is shutting down", "type":
                                                  "ServiceUnavailableError", "param": None, "code": 503}
    assert len(events) == 8 and output.count("shutting down: 8 request(s) in flight end with an error") == 1, output
    assert "Traceback" not in output and "CancelledError" not in output and "Cancel " not in output, output
    assert proc.returncode in (0, -signal.SIGTERM), output
