"""Load benchmark of the HTTP layer: N concurrent streaming requests through `asyncpp serve`
(OpenAI completions over SSE) next to the same workload through AsyncLLM in-process.

Workload W (asyncpp/bench/workload.py): a random 8-layer Llama (hidden 512, vocab 32000, fp32),
token-id prompts of 64..256 tokens (fixed seed), 128 output tokens, greedy, ignore_eos.
The gap between the two rows is what HTTP, JSON and SSE cost.

    python benchmarks/serve_load.py                      # starts its own server on a free port
    python benchmarks/serve_load.py --url http://127.0.0.1:8000   # a running server on W's model
    python benchmarks/serve_load.py --num-requests 16 --pipeline-parallel-size 2

Engine flags (those of `asyncpp serve`) apply to both the server and the in-process engine.
Prefix caching is off unless `--enable-prefix-caching` is given: every round repeats the prompts.
On one machine the load generator shares the cores with the server, which is part of the
HTTP row's cost. On a small or busy machine pass `--num-threads 1`: torch's OpenMP threads
spin-wait, and when the HTTP client or anything else takes one of their cores every step
stalls, which swamps what is being measured (2 cores: 2-8x slower steps, either row).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncpp.bench import Layout, RequestTrace, SystemResult, check_parity, make_prompts, make_workload_model, summarize  # noqa: E402
from asyncpp.engine_args import EngineArgs  # noqa: E402

_WARMUP_PROMPT_LEN = 16  # one short request per system before timing


# -- the server ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, engine_argv: list[str], port: int) -> subprocess.Popen:
    # --model wins over a positional MODEL in engine_argv, and names the same folder.
    cmd = [sys.executable, "-m", "asyncpp", "serve", "--model", model, "--skip-tokenizer-init",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log", *engine_argv]
    return subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])


def wait_healthy(url: str, server: subprocess.Popen | None, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no healthy server at {url} after {timeout_s:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    """SIGINT, as Ctrl-C: uvicorn's lifespan closes the engine and its stage processes."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# -- the HTTP load -------------------------------------------------------------------
async def stream_one(http: httpx.AsyncClient, prompt: list[int], max_tokens: int, trace: RequestTrace) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    trace.start = time.perf_counter()
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            trace.token_ids.extend(chunk["choices"][0]["token_ids"])
            trace.record(time.perf_counter(), len(trace.token_ids))


async def local_one(engine: Any, prompt: list[int], params: Any, trace: RequestTrace) -> None:
    trace.start = time.perf_counter()
    async for out in engine.generate({"prompt_token_ids": prompt}, params):
        trace.token_ids = out.outputs[0].token_ids
        trace.record(time.perf_counter(), len(trace.token_ids))


async def one_round(start_one: Any, prompts: list[list[int]]) -> tuple[list[RequestTrace], float]:
    """Every prompt at once; (traces, seconds until the last token)."""
    traces = [RequestTrace() for _ in prompts]
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for prompt, trace in zip(prompts, traces):
            tg.start_soon(start_one, prompt, trace)
    return traces, max(t.end for t in traces) - start


async def compare(url: str, args: EngineArgs, prompts: list[list[int]], output_len: int,
                  rounds: int) -> list[SystemResult]:
    """Both paths stay up; rounds alternate which goes first, so load drift on a shared
    machine hits both alike."""
    from asyncpp import AsyncLLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=len(prompts) + 1)
    async with AsyncLLM.from_engine_args(args) as engine, \
            httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        systems = {
            "AsyncLLM in-process": lambda prompt, trace: local_one(engine, prompt, params, trace),
            "HTTP: asyncpp serve": lambda prompt, trace: stream_one(http, prompt, output_len, trace),
        }
        warmup = [prompts[0][:_WARMUP_PROMPT_LEN]]
        for start_one in systems.values():
            await one_round(start_one, warmup)
        traces: dict[str, list[RequestTrace]] = {name: [] for name in systems}
        seconds = dict.fromkeys(systems, 0.0)
        for r in range(rounds):
            for name in (list(systems) if r % 2 == 0 else list(systems)[::-1]):
                print(f"[serve_load] round {r + 1}/{rounds}: {name}, {len(prompts)} concurrent requests ...",
                      flush=True)
                round_traces, round_s = await one_round(systems[name], prompts)
                traces[name] += round_traces
                seconds[name] += round_s
    return [summarize(name, "asyncpp", traces[name], seconds[name]) for name in systems]


# -- the comparison ------------------------------------------------------------------
def format_table(results: list[SystemResult]) -> str:
    base = results[0]
    header = ["system", "reqs", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
              "ITL p99 ms", "throughput loss"]
    rows = [header]
    for r in results:
        loss = "-" if r is base else f"{(1 - r.tokens_per_s / base.tokens_per_s) * 100:.1f}%"
        rows.append([r.name, str(r.requests), f"{r.requests / r.total_s:.2f}", f"{r.tokens_per_s:.1f}",
                     f"{r.ttft_p50_ms:.1f}", f"{r.ttft_p99_ms:.1f}", f"{r.itl_p50_ms:.2f}", f"{r.itl_p99_ms:.2f}",
                     loss])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def engine_args(engine_argv: list[str]) -> EngineArgs:
    parser = argparse.ArgumentParser(prog="serve_load.py (engine flags)")
    EngineArgs.add_cli_args(parser)
    return EngineArgs.from_cli_args(parser.parse_args(engine_argv))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64, help="concurrent streaming requests")
    parser.add_argument("--min-prompt-len", type=int, default=64)
    parser.add_argument("--max-prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--bench-seed", type=int, default=0, help="seed of the prompts")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per system, alternating which goes first")
    parser.add_argument("--url", default=None, help="a running `asyncpp serve` on the same model (default: start one)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results here")
    ns, engine_argv = parser.parse_known_args(argv)
    engine_argv = ["--no-enable-prefix-caching", *engine_argv]  # rounds repeat the prompts; a later flag wins
    args = engine_args(engine_argv)
    model = str(args.model or make_workload_model())
    args = replace(args, model=model, skip_tokenizer_init=True)
    layout = Layout(args.pipeline_parallel_size, args.tensor_parallel_size, args.num_virtual_engines).name
    prompts = make_prompts(ns.num_requests, ns.min_prompt_len, ns.max_prompt_len,
                           AutoConfig.from_pretrained(model).vocab_size, ns.bench_seed)

    server = None
    url = ns.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(model, engine_argv, port)
    try:
        wait_healthy(url, server)
        results = anyio.run(compare, url, args, prompts, ns.output_len, ns.rounds)
    finally:
        if server is not None:
            stop_server(server)

    local, remote = results
    print(f"\nmodel {model}; {ns.rounds} round(s) of {len(prompts)} concurrent requests, prompts "
          f"{ns.min_prompt_len}..{ns.max_prompt_len} tokens, {ns.output_len} output tokens, greedy, ignore_eos; "
          f"{layout}; {os.cpu_count()} cores\n")
    print(format_table(results))
    parity = check_parity(results, ns.output_len)
    print("\nparity: " + ("identical greedy token ids over HTTP and in-process" if not parity else "; ".join(parity)))
    if ns.json_out:
        report = {"model": model, "num_requests": len(prompts), "output_len": ns.output_len, "layout": layout,
                  "results": [r.to_json() for r in results], "parity": parity,
                  "throughput_loss": 1 - remote.tokens_per_s / local.tokens_per_s}
        Path(ns.json_out).write_text(json.dumps(report, indent=2))
    return 1 if parity else 0


if __name__ == "__main__":
    sys.exit(main())
