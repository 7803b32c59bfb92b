"""Chat templates as an attack on `asyncpp serve --trust-request-chat-template`: for each kind
of hostile template, four requests at once; each one's status, `param` and latency, how
long /health took meanwhile (polled every 0.1 s), and the peak RSS of the server and of
the renderer processes (sampled every 20 ms, and each renderer's own VmHWM).

    python benchmarks/template_attack.py                       # bundled model, P=2, API key on
    python benchmarks/template_attack.py --kinds memory --json attack.json -- --max-num-seqs 8
Arguments after `--` go to `asyncpp serve`.

Kinds: memory (the issue's: two 1 GB strings), doubling (a string doubled until memory
runs out: it reaches the renderer's cap), loop (10^10 loop steps: killed at the deadline),
recursion (a macro calling itself), range (range(10**9)). The deadline is the server's
(5 s); beyond the pool's two renderers a request waits its turn within it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.soak import children, cmdline, server_parser, split_server_args  # noqa: E402

KEY = "attack-key"
KINDS = {
    "memory": "{{ 'x' * 1000000000 }}{{ 'y' * 1000000000 }}",
    "doubling": "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                "{% endfor %}",
    "loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "range": "{% for i in range(10**9) %}{% endfor %}",
}


def status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def renderer_pids(server_pid: int) -> list[int]:
    return [p for p in children(server_pid) if "template_renderer" in cmdline(p)]


async def attack(url: str, server_pid: int, template: str, requests: int) -> dict[str, Any]:
    peaks = {"server_rss_kib": 0, "renderer_rss_kib": 0, "renderer_hwm_kib": 0}
    answers: list[dict[str, Any]] = []
    health: list[float] = []
    done = anyio.Event()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "chat_template": template}
    headers = {"Authorization": f"Bearer {KEY}"}

    async def one(http: httpx.AsyncClient) -> None:
        start = time.monotonic()
        response = await http.post("/v1/chat/completions", json=body, headers=headers)
        error = response.json().get("error", {}) if response.status_code != 200 else {}
        answers.append({"status": response.status_code, "param": error.get("param"),
                        "message": (error.get("message") or "")[:90], "seconds": round(time.monotonic() - start, 2)})

    async def sample() -> None:
        while not done.is_set():
            peaks["server_rss_kib"] = max(peaks["server_rss_kib"], status_kb(server_pid, "VmRSS"))
            for pid in renderer_pids(server_pid):
                peaks["renderer_rss_kib"] = max(peaks["renderer_rss_kib"], status_kb(pid, "VmRSS"))
                peaks["renderer_hwm_kib"] = max(peaks["renderer_hwm_kib"], status_kb(pid, "VmHWM"))
            await anyio.sleep(0.02)

    async def poll_health(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            start = time.monotonic()
            await http.get("/health")
            health.append(time.monotonic() - start)
            await anyio.sleep(0.1)

    async with httpx.AsyncClient(base_url=url, timeout=300) as http, anyio.create_task_group() as tg:
        tg.start_soon(sample)
        tg.start_soon(poll_health, http)
        async with anyio.create_task_group() as clients:
            for _ in range(requests):
                clients.start_soon(one, http)
        done.set()
    return {"answers": sorted(answers, key=lambda a: a["seconds"]), "health_max_s": round(max(health), 3),
            "health_polls": len(health), **peaks,
            "server_rss_after_kib": status_kb(server_pid, "VmRSS")}


def main(argv: list[str] | None = None) -> int:
    argv, server_args = split_server_args(argv)
    parser = server_parser(__doc__)
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=list(KINDS))
    parser.add_argument("--requests", type=int, default=4, help="requests at once per kind")
    parser.add_argument("--json", dest="json_out", default=None, help="write the report here")
    ns = parser.parse_args(argv)
    from benchmarks.serve_load import free_port, stop_server, wait_healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fd, log_path = tempfile.mkstemp(prefix="asyncpp-attack-", suffix=".log")
    cmd = [sys.executable, "-m", "asyncpp", "serve", *(["--model", ns.model] if ns.model else []),
           "--pipeline-parallel-size", str(ns.pipeline_parallel_size), "--port", str(port), "--api-key", KEY,
           "--trust-request-chat-template", "--no-access-log", *server_args]
    print(f"[attack] {' '.join(cmd[1:])}; log {log_path}", flush=True)
    with os.fdopen(fd, "wb") as log:
        server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    report: dict[str, Any] = {"log": log_path}
    try:
        wait_healthy(url, server, timeout_s=600)
        report["server_rss_start_kib"] = status_kb(server.pid, "VmRSS")
        report["renderers_at_start"] = len(renderer_pids(server.pid))
        for kind in ns.kinds:
            report[kind] = result = anyio.run(attack, url, server.pid, KINDS[kind], ns.requests)
            print(f"\n{kind}: {KINDS[kind][:70]}", flush=True)
            for a in result["answers"]:
                print(f"  {a['status']} param={a['param']} after {a['seconds']:.2f} s: {a['message']}")
            mib = {k: v / 1024 for k, v in result.items() if k.endswith("_kib")}
            print(f"  /health: slowest of {result['health_polls']} polls {result['health_max_s']:.3f} s; peak RSS: "
                  f"server {mib['server_rss_kib']:.0f} MiB (after: {mib['server_rss_after_kib']:.0f} MiB), "
                  f"renderer {mib['renderer_rss_kib']:.0f} MiB sampled, {mib['renderer_hwm_kib']:.0f} MiB VmHWM",
                  flush=True)
    finally:
        stop_server(server)
    print(f"\nserver RSS at start {report.get('server_rss_start_kib', 0) / 1024:.0f} MiB; renderers started with the "
          f"server: {report.get('renderers_at_start')}; exit code {server.returncode}")
    if ns.json_out:
        Path(ns.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
