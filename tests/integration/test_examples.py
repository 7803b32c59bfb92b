"""Every program in examples/ runs as a user would run it (a fresh interpreter, outside the
repository), on the tiny random model the pytest plugin builds. The subprocess timeouts only
stop a hung example; nothing here measures time."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HANG_S = 600

pytestmark = pytest.mark.asyncpp(model="tiny")


def run_example(name: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_every_example_is_run_here():
    tested = set(re.findall(r'"(\w+\.py)"', Path(__file__).read_text()))
    assert {p.name for p in EXAMPLES.glob("*.py")} <= tested


def test_offline_batch_on_two_stages(asyncpp_tiny_model, tmp_path):
    out = run_example("offline_batch.py", "--model", str(asyncpp_tiny_model), "--max-tokens", "6", cwd=tmp_path)
    assert out.count("(6 tokens, length)") == 4, out


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_concurrent_streams_cancel_one_and_free_it(asyncpp_tiny_model, tmp_path, backend):
    out = run_example("concurrent_streams.py", "--model", str(asyncpp_tiny_model), "--backend", backend,
                      "--max-tokens", "16", cwd=tmp_path)
    cancelled = re.search(r"\[clock\] cancelled after \d+ tokens: running requests 4 -> 3, "
                          r"KV blocks in use (\d+) -> (\d+)", out)
    assert cancelled and int(cancelled[1]) > int(cancelled[2]), out
    assert out.count("length after 16 tokens") == 3 and "all done: running requests 0, KV blocks in use 0" in out


def test_pipeline_layout_reports_partition_and_stats(asyncpp_tiny_model, tmp_path):
    out = run_example("pipeline_layout.py", "--model", str(asyncpp_tiny_model), "--partition", "3,1",
                      "--virtual-engines", "2", "--max-tokens", "6", "--copies", "1", cwd=tmp_path)
    assert "P=2, V=2: 4 layers split [3, 1]" in out, out
    assert re.search(r"\d+ microbatches in [\d.]+ s; stage busy [\d.]+ / [\d.]+; bubble [\d.]+", out), out


@pytest.mark.parametrize("name", ["chat_client.py", "openai_chat_client.py"])
def test_chat_clients_against_the_server(asyncpp_server, tmp_path, name):
    out = run_example(name, "--base-url", asyncpp_server, "--message", "What is the capital of France?",
                      "--max-tokens", "8", "--temperature", "0", cwd=tmp_path)
    assert out.startswith("assistant> ") and len(out.strip()) > len("assistant>"), out


def test_starlette_app_serves_and_shuts_down(asyncpp_tiny_model, tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "starlette_app.py"), "--model", str(asyncpp_tiny_model),
                             "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            _wait_healthy(http, proc)
            body = {"prompt": "The capital of France is", "max_tokens": 6}
            completion = http.post("/complete", json=body).json()
            streamed = http.post("/stream", json=body).text
            refused = http.post("/complete", json={"prompt": "x", "max_tokens": 0})
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert completion["finish_reason"] == "length" and streamed == completion["text"]
    assert refused.status_code == 400 and "max_tokens" in refused.json()["error"]
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in output, output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(http: httpx.Client, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the example exited early: {proc.stdout.read()}"
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the example never became healthy")
