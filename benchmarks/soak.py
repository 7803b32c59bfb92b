"""Soak test of `asyncpp serve`: minutes of concurrent streaming load with clients that
disconnect, bad requests mixed in, and a stage process SIGKILLed halfway, then one of the
stages its restart spawns (twice in a row); then what is left: failures by reason, the
recovery time, KV blocks still in use, each process's RSS and the log volume.

    python benchmarks/soak.py                                    # bundled model, P=2, 180 s, 256 streams
    python benchmarks/soak.py --duration 30 --concurrency 32     # a quick smoke run
    python benchmarks/soak.py --model path/to/hf-model --json soak.json -- --max-num-seqs 128
Arguments after `--` go to `asyncpp serve`.

The load: --concurrency workers, each sending one streaming /v1/completions request after
another until --duration is over: a prompt of random words, max_tokens in --min/--max-tokens,
temperature 0.7. A random --disconnect-fraction of them is closed after 1..4 chunks on
purpose. A --bad-fraction of the requests is bad on purpose (invalid JSON, negative
temperature, unknown model, too many stop strings, wrong content type); each must get a 4xx.
A worker whose request failed waits --backoff seconds (or the answer's Retry-After, up to
10 s) before its next one, so 503s during the restart do not spin the shared cores.

At --kill-at of the run (default halfway) one stage process (the last spawned child of the
server running multiprocessing's spawn_main) gets SIGKILL; with --kills 2 (the default) the
first stage process the restart spawns gets SIGKILL too, as soon as it exists (a death
during the restart, which costs a second of the --max-stage-restarts). The recovery time
is from the first kill until /health answers 200 again after it has answered anything else
(polled every 0.2 s). At --duration new requests stop; those still streaming get --grace seconds, then are
cut. After that /metrics `asyncpp:kv_cache_blocks_used` is polled until 0 (--drain-timeout).
RSS is each process's VmRSS (the server; its stage processes, by rank order; the chat
template renderers, when any) after the warm-up, at the kill and at the end. The server's stdout and stderr
go to a log file (kept; its path is printed). The server is stopped with SIGINT (SIGKILL
after 60 s) and any descendant still alive afterwards is killed and reported.

Client, server and stages share the machine's cores: the client is one process, async.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the quick brown fox jumps over lazy dog river mountain city light night morning story "
         "engine garden window paper music ocean forest silver golden winter summer bridge stone "
         "cloud market teacher doctor planet signal number letter question answer reason travel "
         "kitchen library village castle dragon robot coffee bread apple orange yellow purple").split()

BAD_KINDS = ("invalid JSON", "temperature -1", "unknown model", "64 stop strings", "text/plain body",
             "streamed prompt_logprobs", "a million ids")


# -- processes -----------------------------------------------------------------------
def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        p = todo.pop(0)
        found.append(p)
        todo += children(p)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def rss_by_process(server_pid: int) -> dict[str, int]:
    """VmRSS of the server and each of its workers, named by role (stages by rank order)."""
    out = {"server": rss_bytes(server_pid)}
    for i, pid in enumerate(stage_pids(server_pid)):
        out[f"stage {i}"] = rss_bytes(pid)
    for i, pid in enumerate(sorted(p for p in children(server_pid) if "template_renderer" in cmdline(p))):
        out[f"renderer {i}"] = rss_bytes(pid)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stage_pids(server_pid: int) -> list[int]:
    """The server's spawned stage processes (not the resource tracker), oldest first."""
    return sorted(p for p in children(server_pid) if "spawn_main" in cmdline(p))


# -- the load --------------------------------------------------------------------------
@dataclass
class Stats:
    started: int = 0
    ok: int = 0
    disconnected: int = 0
    cut_at_end: int = 0
    chunks: int = 0
    failures: list[tuple[str, float]] = field(default_factory=list)  # (reason, monotonic time)
    bad: dict[str, Counter] = field(default_factory=lambda: {k: Counter() for k in BAD_KINDS})

    def fail(self, reason: str) -> None:
        self.failures.append((reason, time.monotonic()))

    def failed(self, killed_at: float | None, recovered_s: float | None) -> dict[str, Counter]:
        """{reason: {when: count}}, when: before the kill, from the kill until 5 s after
        /health is 200 again, or after that."""
        out: dict[str, Counter] = {}
        for reason, t in self.failures:
            if killed_at is None or t < killed_at:
                when = "before kill"
            elif recovered_s is None or t <= killed_at + recovered_s + 5:
                when = "kill..recovery+5s"
            else:
                when = "after recovery"
            out.setdefault(reason, Counter())[when] += 1
        return dict(sorted(out.items(), key=lambda kv: -sum(kv[1].values())))


def first_words(text: str, n: int = 10) -> str:
    words = text.replace("\n", " ").split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")


@dataclass
class Run:
    ns: argparse.Namespace
    url: str
    model: str
    server: subprocess.Popen
    rng: random.Random
    stats: Stats = field(default_factory=Stats)
    stopping: bool = False
    killed_at: float | None = None
    kill: dict[str, Any] = field(default_factory=dict)
    rss: dict[str, dict[str, int]] = field(default_factory=dict)  # when -> process -> bytes
    seen_pids: set[int] = field(default_factory=set)
    t_start: float = 0.0

    def prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(self.ns.min_words, self.ns.max_words)))

    async def one(self, http: httpx.AsyncClient) -> float:
        """One streaming request; seconds to wait before the next (0 when it did not fail)."""
        ns, stats = self.ns, self.stats
        body = {"model": self.model, "prompt": self.prompt(), "stream": True, "temperature": 0.7,
                "max_tokens": self.rng.randint(ns.min_tokens, ns.max_tokens)}
        cut_after = self.rng.randint(1, 4) if self.rng.random() < ns.disconnect_fraction else None
        stats.started += 1
        chunks = 0
        try:
            with anyio.fail_after(ns.request_timeout):
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        msg = error_message(await response.aread())
                        stats.fail(f"HTTP {response.status_code}: {first_words(msg)}")
                        try:
                            retry_after = float(response.headers.get("retry-after", 0))
                        except ValueError:
                            retry_after = 0
                        return max(ns.backoff, min(retry_after, 10.0))
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            stats.ok += 1
                            return 0
                        if '"error"' in line:
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                stats.fail(f"stream error: {first_words(chunk['error'].get('message', ''))}")
                                return ns.backoff
                        chunks += 1
                        stats.chunks += 1
                        if cut_after is not None and chunks >= cut_after:
                            stats.disconnected += 1
                            return 0  # leaving the block closes the connection mid-stream
                    stats.fail("stream ended without [DONE]")
                    return ns.backoff
        except TimeoutError:
            stats.fail(f"client timeout ({ns.request_timeout:.0f} s)")
        except httpx.HTTPError as e:
            stats.fail(f"transport: {type(e).__name__}")
        except anyio.get_cancelled_exc_class():
            if self.stopping:
                stats.cut_at_end += 1
            raise
        return ns.backoff

    async def bad(self, http: httpx.AsyncClient) -> None:
        kind = self.rng.choice(BAD_KINDS)
        good = {"model": self.model, "prompt": self.prompt(), "max_tokens": 8}
        headers = {"content-type": "application/json"}
        if kind == "invalid JSON":
            content = json.dumps(good)[:-7].encode()
        elif kind == "temperature -1":
            content = json.dumps(good | {"temperature": -1}).encode()
        elif kind == "unknown model":
            content = json.dumps(good | {"model": "no-such-model"}).encode()
        elif kind == "64 stop strings":
            content = json.dumps(good | {"stop": [f"stop{i}" for i in range(64)]}).encode()
        elif kind == "streamed prompt_logprobs":
            content = json.dumps(good | {"prompt_logprobs": 1, "stream": True}).encode()
        elif kind == "a million ids":
            content = json.dumps(good | {"prompt": [1] * 1_000_000}, separators=(",", ":")).encode()
        else:
            content, headers = json.dumps(good).encode(), {"content-type": "text/plain"}
        try:
            with anyio.fail_after(self.ns.request_timeout):
                response = await http.post("/v1/completions", content=content, headers=headers)
            self.stats.bad[kind][str(response.status_code)] += 1
        except TimeoutError:
            self.stats.bad[kind]["client timeout"] += 1
        except httpx.HTTPError as e:
            self.stats.bad[kind][f"transport: {type(e).__name__}"] += 1

    async def worker(self, http: httpx.AsyncClient, end: float) -> None:
        while time.monotonic() < end:
            if self.rng.random() < self.ns.bad_fraction:
                await self.bad(http)
            elif wait := await self.one(http):
                await anyio.sleep(wait)

    async def killer(self, health: httpx.AsyncClient, at: float) -> None:
        await anyio.sleep(max(0.0, at - time.monotonic()))
        pid = self.server.pid
        self.rss["middle"] = rss_by_process(pid)
        stages = stage_pids(pid)
        self.seen_pids.update(descendants(pid))
        if not stages:
            self.kill["error"] = "no stage process found among the server's children"
            return
        victim = stages[-1]
        self.kill |= {"pid": victim, "cmdline": cmdline(victim)[:120], "stages_before": stages}
        os.kill(victim, signal.SIGKILL)
        self.killed_at = t0 = time.monotonic()
        print(f"[soak] t={t0 - self.t_start:.1f}s SIGKILL stage pid {victim}", flush=True)
        async with anyio.create_task_group() as tg:
            if self.ns.kills > 1:
                tg.start_soon(self.kill_a_restarting_stage, set(stages))
            while not self.recovery_step(await self.health_code(health)):
                await anyio.sleep(0.2)

    async def kill_a_restarting_stage(self, old: set[int]) -> None:
        """SIGKILL the first stage process the restart spawns, as soon as it exists."""
        assert self.killed_at is not None
        while time.monotonic() - self.killed_at < self.ns.recovery_timeout:
            fresh = [p for p in stage_pids(self.server.pid) if p not in old]
            if fresh:
                self.seen_pids.update(fresh)
                os.kill(fresh[0], signal.SIGKILL)
                self.kill["second_pid"] = fresh[0]
                self.kill["second_after_s"] = round(time.monotonic() - self.killed_at, 2)
                print(f"[soak] {self.kill['second_after_s']} s later SIGKILL the restarting stage pid {fresh[0]}",
                      flush=True)
                return
            await anyio.sleep(0.01)

    async def health_code(self, health: httpx.AsyncClient) -> int | None:
        try:
            return (await health.get("/health", timeout=2)).status_code
        except httpx.HTTPError:
            return None

    def recovery_step(self, code: int | None) -> bool:
        """One /health answer after the kill; True once recovered or given up."""
        k, now = self.kill, time.monotonic() - self.killed_at
        if code != 200 and "health_down_after_s" not in k:
            k["health_down_after_s"] = round(now, 2)
            k["health_status_while_down"] = code
        elif code == 200 and "health_down_after_s" in k:
            k["recovery_s"] = round(now, 2)
            k["stages_after"] = stage_pids(self.server.pid)
            self.seen_pids.update(descendants(self.server.pid))
            print(f"[soak] /health 200 again {now:.1f} s after the kill", flush=True)
            return True
        if now > self.ns.recovery_timeout:
            k["recovery_s"] = None
            k["error"] = (f"/health not 200 again within {self.ns.recovery_timeout:.0f} s"
                          if "health_down_after_s" in k else
                          f"/health never left 200 within {self.ns.recovery_timeout:.0f} s")
            return True
        return False

    def finish_recovery(self) -> None:
        """The load ended before the server recovered: keep polling /health."""
        if self.killed_at is None or "recovery_s" in self.kill:
            return
        while True:
            try:
                code: int | None = httpx.get(f"{self.url}/health", timeout=2).status_code
            except httpx.HTTPError:
                code = None
            if self.recovery_step(code):
                return
            time.sleep(0.2)

    async def progress(self, end: float) -> None:
        while time.monotonic() < end:
            await anyio.sleep(min(15.0, max(0.1, end - time.monotonic())))
            s = self.stats
            print(f"[soak] t={time.monotonic() - self.t_start:.0f}s started {s.started} ok {s.ok} "
                  f"disconnected {s.disconnected} failed {len(s.failures)}", flush=True)

    async def load(self) -> None:
        ns = self.ns
        limits = httpx.Limits(max_connections=ns.concurrency + 8, max_keepalive_connections=ns.concurrency + 8)
        timeout = httpx.Timeout(ns.request_timeout, connect=30)
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits) as http, \
                httpx.AsyncClient(base_url=self.url, timeout=5) as health:
            self.t_start = time.monotonic()
            end = self.t_start + ns.duration
            with anyio.move_on_after(ns.duration + ns.grace) as scope:
                async with anyio.create_task_group() as tg:
                    for _ in range(ns.concurrency):
                        tg.start_soon(self.worker, http, end)
                    tg.start_soon(self.progress, end)
                    if not ns.no_kill:
                        tg.start_soon(self.killer, health, self.t_start + ns.duration * ns.kill_at)
                    await anyio.sleep(ns.duration)
                    self.stopping = True
            if scope.cancelled_caught:
                print(f"[soak] requests still streaming {ns.grace:.0f} s after the end were cut", flush=True)


# -- after the load --------------------------------------------------------------------
def kv_blocks_used(url: str) -> float | None:
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("asyncpp:kv_cache_blocks_used"):
            return float(line.rsplit(None, 1)[1])
    return None


def drain(url: str, timeout_s: float) -> tuple[float | None, float]:
    t0 = time.monotonic()
    while True:
        used = kv_blocks_used(url)
        if used == 0 or time.monotonic() - t0 > timeout_s:
            return used, time.monotonic() - t0
        time.sleep(0.5)


def health(url: str) -> str:
    try:
        r = httpx.get(f"{url}/health", timeout=5)
    except httpx.HTTPError as e:
        return f"transport: {type(e).__name__}"
    return f"{r.status_code}" + (f" {first_words(r.text, 12)}" if r.status_code != 200 else "")


def start_server(ns: argparse.Namespace, port: int, log: Any) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "asyncpp", "serve", *(["--model", ns.model] if ns.model else []),
           "--pipeline-parallel-size", str(ns.pipeline_parallel_size), "--host", "127.0.0.1", "--port", str(port),
           *([] if ns.access_log else ["--no-access-log"]), *ns.server_args]
    print(f"[soak] {' '.join(cmd[1:])}", flush=True)
    # Its own session: a Ctrl-C here reaches only this script, whose finally stops the server.
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def warm_up(url: str, model: str) -> None:
    for _ in range(2):
        r = httpx.post(f"{url}/v1/completions", timeout=120,
                       json={"model": model, "prompt": "The capital of France is", "max_tokens": 8})
        r.raise_for_status()


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def report_rows(ns: argparse.Namespace, run: Run, end: dict[str, Any]) -> list[tuple[str, str]]:
    s = run.stats
    rows = [("requests started (streaming)", str(s.started)),
            ("  completed OK ([DONE])", str(s.ok)),
            ("  disconnected on purpose", str(s.disconnected)),
            ("  cut at the end (client stopped)", str(s.cut_at_end)),
            ("  failed", str(len(s.failures)))]
    failed = s.failed(run.killed_at, run.kill.get("recovery_s"))
    rows += [(f"    {reason}", f"{sum(c.values())} ({', '.join(f'{w} {n}' for w, n in c.items())})")
             for reason, c in failed.items()]
    rows.append(("chunks received", str(s.chunks)))
    n_bad = sum(sum(c.values()) for c in s.bad.values())
    non4xx = sum(n for c in s.bad.values() for status, n in c.items()
                 if not (status.isdigit() and 400 <= int(status) < 500))
    rows.append(("bad requests sent", f"{n_bad} (non-4xx answers: {non4xx})"))
    rows += [(f"  {kind}", ", ".join(f"{st} x{n}" for st, n in sorted(c.items())) or "-") for kind, c in s.bad.items()]
    k = run.kill
    if ns.no_kill:
        rows.append(("stage kill", "off (--no-kill)"))
    elif "pid" not in k:
        rows.append(("stage kill", k.get("error", "not reached")))
    else:
        rows.append(("stage killed (SIGKILL)", f"pid {k['pid']} of stages {k['stages_before']}"))
        if "second_pid" in k:
            rows.append(("  then a restarting stage", f"pid {k['second_pid']}, {k['second_after_s']} s after"))
        rows.append(("  /health not 200 after", f"{k.get('health_down_after_s', '-')} s "
                                                f"(status {k.get('health_status_while_down', '-')})"))
        rec = k.get("recovery_s")
        rows.append(("  recovery: kill -> /health 200", f"{rec} s" if rec is not None else k.get("error", "-")))
        if "stages_after" in k:
            rows.append(("  stages after", str(k["stages_after"])))
    rows += [("/health at the end", end["health"]),
             ("KV blocks used at the end", f"{end['kv_blocks_used']} (after {end['drain_s']:.1f} s of polling)"),
             *rss_rows(run.rss),
             ("server log", f"{end['log_bytes']} bytes, {end['log_lines']} lines "
                            f"({end['log_warnings']} WARNING, {end['log_errors']} ERROR, "
                            f"{end['log_tracebacks']} Traceback)"),
             ("server exit code", str(end.get("exit_code"))),
             ("processes left behind", str(end.get("left_behind", "-")))]
    return rows


def rss_rows(rss: dict[str, dict[str, int]]) -> list[tuple[str, str]]:
    """One row per process: its RSS after the warm-up / at the kill / at the end."""
    names = list(dict.fromkeys(name for when in rss.values() for name in when))
    return [(f"RSS {name} (warm-up / middle / end)",
             " / ".join(mib(rss.get(when, {}).get(name)) for when in ("start", "middle", "end"))) for name in names]


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def split_server_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(this script's arguments, those after `--`, for `asyncpp serve`)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def server_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with the server's model and pipeline size."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, server_args = split_server_args(argv)
    parser = server_parser(__doc__)
    parser.add_argument("--duration", type=float, default=180, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=256, help="concurrent streaming requests")
    parser.add_argument("--min-words", type=int, default=12, help="prompt length in words, at least")
    parser.add_argument("--max-words", type=int, default=48, help="prompt length in words, at most")
    parser.add_argument("--min-tokens", type=int, default=32, help="max_tokens, at least")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens, at most")
    parser.add_argument("--disconnect-fraction", type=float, default=1 / 3,
                        help="share of streams closed after 1..4 chunks")
    parser.add_argument("--bad-fraction", type=float, default=0.03, help="share of bad requests")
    parser.add_argument("--kill-at", type=float, default=0.5, help="when to SIGKILL a stage (fraction of --duration)")
    parser.add_argument("--no-kill", action="store_true", help="kill no stage")
    parser.add_argument("--kills", type=int, choices=(1, 2), default=2,
                        help="2: also kill a stage the restart spawns, while it starts (default)")
    parser.add_argument("--request-timeout", type=float, default=120, help="seconds per request, at most")
    parser.add_argument("--backoff", type=float, default=0.5, help="a worker's pause after a failed request")
    parser.add_argument("--grace", type=float, default=10, help="seconds streams may finish after --duration")
    parser.add_argument("--recovery-timeout", type=float, default=300, help="seconds to wait for /health 200 after it")
    parser.add_argument("--drain-timeout", type=float, default=10, help="seconds to wait for KV blocks to reach 0")
    parser.add_argument("--access-log", action="store_true", help="keep uvicorn's access log (default: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_out", default=None, help="write the report here")
    ns = parser.parse_args(argv)
    ns.server_args = server_args
    # Here, not at the top: serve_load imports torch and transformers, and --help needs neither.
    from benchmarks.serve_load import free_port, stop_server, wait_healthy

    fd, log_path = tempfile.mkstemp(prefix="asyncpp-soak-", suffix=".log")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    end: dict[str, Any] = {}
    with os.fdopen(fd, "wb") as log:
        server = start_server(ns, port, log)
    run: Run | None = None
    try:
        wait_healthy(url, server, timeout_s=600)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        warm_up(url, model)
        run = Run(ns, url, model, server, random.Random(ns.seed))
        run.seen_pids.update(descendants(server.pid))
        print(f"[soak] server pid {server.pid}, children {[(p, cmdline(p)[:60]) for p in children(server.pid)]}",
              flush=True)
        run.rss["start"] = rss_by_process(server.pid)
        print(f"[soak] model {model}; {ns.concurrency} streams for {ns.duration:.0f} s; log {log_path}", flush=True)
        anyio.run(run.load)
        run.finish_recovery()
        end["kv_blocks_used"], end["drain_s"] = drain(url, ns.drain_timeout)
        end["health"] = health(url)
        run.rss["end"] = rss_by_process(server.pid)
        run.seen_pids.update(descendants(server.pid))
    finally:
        seen = (run.seen_pids if run else set()) | set(descendants(server.pid))
        if server.poll() is None:
            stop_server(server)
        end["exit_code"] = server.returncode
        time.sleep(1)
        left = sorted(p for p in seen if alive(p))
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        end["left_behind"] = f"{len(left)} {left}" if left else "0"
    text = Path(log_path).read_bytes()
    lines = text.decode(errors="replace").splitlines()
    end |= {"log_bytes": len(text), "log_lines": len(lines),
            "log_warnings": sum("WARNING" in ln for ln in lines), "log_errors": sum("ERROR" in ln for ln in lines),
            "log_tracebacks": sum(ln.startswith("Traceback") for ln in lines)}

    print(f"\nsoak: {run.model}, P={ns.pipeline_parallel_size}, {ns.concurrency} streams for {ns.duration:.0f} s "
          f"(+{ns.grace:.0f} s grace), max_tokens {ns.min_tokens}..{ns.max_tokens}, temperature 0.7, "
          f"{ns.disconnect_fraction:.0%} disconnect, {ns.bad_fraction:.0%} bad; {os.cpu_count()} cores; "
          f"server args {ns.server_args or '-'}; log {log_path}\n")
    rows = report_rows(ns, run, end)
    print(format_rows(rows))
    if ns.json_out:
        s = run.stats
        report = {"model": run.model, "args": {k: v for k, v in vars(ns).items() if k != "json_out"},
                  "started": s.started, "ok": s.ok, "disconnected": s.disconnected, "cut_at_end": s.cut_at_end,
                  "chunks": s.chunks,
                  "failed": {r: dict(c) for r, c in s.failed(run.killed_at, run.kill.get("recovery_s")).items()},
                  "bad": {k: dict(c) for k, c in s.bad.items()}, "kill": run.kill, "rss_bytes": run.rss,
                  "end": end, "log_path": log_path, "table": rows}
        Path(ns.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
