"""Serving under load, asyncpp next to vLLM: vLLM's own load client (`vllm bench serve`)
drives `asyncpp serve` and `vllm serve` alike with the same random prompts.

The bundled SmolLM2-135M-Instruct (fp32), 256 random prompt tokens, 128 output tokens,
`ignore_eos`, 96 requests, 32 at a time, streamed over /v1/completions. Each system gets
a fresh server, one short warm-up run of the load client, then the timed run; systems
take turns for --rounds rounds, and each row is the median round by output tok/s. Prefix
caching is off in both (benchmarks/prefix_cache.py compares it).

vLLM runs in its own venv (it pins its own torch): see benchmarks/README.md.

    python benchmarks/serve_vs_vllm.py --vllm-python VLLM_VENV/bin/python
    python benchmarks/serve_vs_vllm.py --vllm-python VLLM_VENV/bin/python --layouts p2 --rounds 2
    python benchmarks/serve_vs_vllm.py --systems asyncpp --layouts p2 -- --max-num-batched-tokens 128
Arguments after `--` go to `asyncpp serve`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asyncpp.model.default_model import DEFAULT_MODEL_NAME, bundled_model_path  # noqa: E402
from benchmarks.serve_load import free_port, wait_healthy  # noqa: E402

METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")


@dataclass(slots=True)
class System:
    kind: str  # "asyncpp" | "vllm"
    pp: int
    runs: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{'asyncpp' if self.kind == 'asyncpp' else 'vLLM 0.32'} P={self.pp}"


def vllm_env(vllm_python: str, pp: int) -> dict[str, str]:
    venv = Path(vllm_python).absolute().parents[1]  # not resolve(): the venv's python links out of it
    gomp = next(venv.glob("lib/python3*/site-packages/torch/lib/libgomp.so.1"))
    cores = os.cpu_count() or 1
    bind = "|".join(str(c) for c in range(cores)) if pp > 1 else f"0-{cores - 1}"
    return {**os.environ, "LD_PRELOAD": str(gomp), "VLLM_CPU_KVCACHE_SPACE": "4",
            "VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}


def start(system: System, model: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    if system.kind == "asyncpp":
        cmd = [sys.executable, "-m", "asyncpp", "serve", str(model), "--served-model-name", DEFAULT_MODEL_NAME,
               "--port", str(port), "--dtype", "float32", "--pipeline-parallel-size", str(system.pp),
               "--log-level", "warning", "--no-access-log", "--no-enable-prefix-caching",  # as vLLM's below
               *args.asyncpp_args]
        return subprocess.Popen(cmd, cwd=REPO)
    cmd = [args.vllm_python, str(REPO / "benchmarks" / "vllm_cli.py"), "serve", str(model),
           "--served-model-name", DEFAULT_MODEL_NAME, "--port", str(port), "--dtype", "float32",
           "--pipeline-parallel-size", str(system.pp), "--max-model-len", "2048",
           "--no-enable-prefix-caching", "--no-enable-log-requests"]
    return subprocess.Popen(cmd, env=vllm_env(args.vllm_python, system.pp), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def load(url: str, model: Path, args: argparse.Namespace, num_prompts: int, out: Path) -> dict:
    cmd = [args.vllm_python, str(REPO / "benchmarks" / "vllm_cli.py"), "bench", "serve", "--backend", "openai",
           "--base-url", url, "--endpoint", "/v1/completions", "--model", DEFAULT_MODEL_NAME,
           "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(num_prompts),
           "--max-concurrency", str(args.concurrency), "--ignore-eos", "--seed", "0",
           "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    # The load client is single-threaded Python: keep it off torch's thread pools.
    env = {**vllm_env(args.vllm_python, 1), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_one(system: System, model: Path, args: argparse.Namespace, workdir: Path, tag: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(system, model, port, args)
    try:
        wait_healthy(url, server, timeout_s=600)  # vLLM compiles its graphs first
        load(url, model, args, args.concurrency // 4 or 1, workdir / f"warmup-{tag}.json")
        result = load(url, model, args, args.num_prompts, workdir / f"{tag}.json")
        system.runs.append({k: result[k] for k in METRICS})
        print(f"[serve_vs_vllm] {system.name} {tag}: " + ", ".join(f"{k} {result[k]:.1f}" for k in METRICS),
              flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def table(systems: list[System]) -> str:
    lines = ["| system | out tok/s (runs) | TTFT p50 / p99 ms | ITL p50 / p99 ms | ITL p99 / p50 |",
             "| --- | --- | --- | --- | --- |"]
    for s in systems:
        if not s.runs:
            continue
        run = sorted(s.runs, key=lambda r: r["output_throughput"])[len(s.runs) // 2]
        runs = ", ".join(f"{r['output_throughput']:.1f}" for r in s.runs)
        lines.append(f"| {s.name} | {run['output_throughput']:.1f} ({runs}) | {run['median_ttft_ms']:.0f} / "
                     f"{run['p99_ttft_ms']:.0f} | {run['median_itl_ms']:.0f} / {run['p99_itl_ms']:.0f} | "
                     f"{run['p99_itl_ms'] / run['median_itl_ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", required=True, help="vLLM's venv interpreter (also runs the load client)")
    parser.add_argument("--systems", default="asyncpp vllm")
    parser.add_argument("--layouts", default="p1 p2")
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", help="also write every run here")
    args, rest = parser.parse_known_args()
    args.asyncpp_args = [a for a in rest if a != "--"]
    model = bundled_model_path()
    systems = [System(kind, int(layout[1:])) for layout in args.layouts.split() for kind in args.systems.split()]
    with tempfile.TemporaryDirectory(prefix="serve-vs-vllm-") as tmp:
        for round_ in range(args.rounds):
            for system in systems:
                run_one(system, model, args, Path(tmp), f"{system.kind}-p{system.pp}-r{round_}")
    print(f"\n{args.num_prompts} requests, {args.concurrency} concurrent, {args.input_len} random prompt tokens, "
          f"{args.output_len} output tokens, ignore_eos, fp32, {DEFAULT_MODEL_NAME}; "
          f"asyncpp flags: {' '.join(args.asyncpp_args) or '(defaults)'}\n")
    print(table(systems))
    if args.json:
        Path(args.json).write_text(json.dumps([{"system": s.name, "runs": s.runs} for s in systems], indent=2))


if __name__ == "__main__":
    main()
