"""Serving under load, asyncpp next to vLLM: vLLM's own load client (`vllm bench serve`)
drives `asyncpp serve` and `vllm serve` alike with the same random prompts.

The bundled SmolLM2-135M-Instruct (fp32), 256 random prompt tokens, 128 output tokens,
`ignore_eos`, 96 requests, 32 at a time, streamed over /v1/completions. Each system gets
a fresh server, one short warm-up run of the load client, then the timed run; systems
take turns for --rounds rounds, and each row is the median round by output tok/s. Prefix
caching is off in both (benchmarks/prefix_cache.py compares it).

`--modes "plain json"` adds structured output: in mode `json` every request carries the same
JSON schema (`response_format` json_schema, passed with the load client's --extra-body),
without ignore_eos: the schema ends the output (6 objects of an id and an enum, ~110-130
tokens; max_tokens 1.5 x the output length, so no output is cut), temperature 1, compact JSON
on both servers (asyncpp
--structured-outputs-max-whitespace 0, vLLM disable_any_whitespace). The table adds the
mean output length and the share of outputs that validate against the schema (jsonschema).
Each server runs its modes in turn, each mode with its own warm-up.

vLLM runs in its own venv (it pins its own torch): see benchmarks/README.md.

    python benchmarks/serve_vs_vllm.py --vllm-python VLLM_VENV/bin/python
    python benchmarks/serve_vs_vllm.py --vllm-python VLLM_VENV/bin/python --layouts p2 --rounds 2
    python benchmarks/serve_vs_vllm.py --systems asyncpp --layouts p2 -- --max-num-batched-tokens 128
    python benchmarks/serve_vs_vllm.py --vllm-python VLLM_VENV/bin/python --modes "plain json"
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

import jsonschema

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asyncpp.model.default_model import DEFAULT_MODEL_NAME, bundled_model_path  # noqa: E402
from benchmarks.serve_load import free_port, wait_healthy  # noqa: E402

METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")
SCHEMA = {"type": "object", "properties": {"items": {
    "type": "array", "minItems": 6, "maxItems": 6, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "kind": {"enum": ["alpha", "beta", "gamma", "delta"]}},
        "required": ["id", "kind"]}}}, "required": ["items"]}
MODES = {"plain": None, "json": {"response_format": {"type": "json_schema",
                                                     "json_schema": {"name": "items", "schema": SCHEMA}},
                                 "temperature": 1.0}}


@dataclass(slots=True)
class System:
    kind: str  # "asyncpp" | "vllm"
    pp: int
    modes: tuple[str, ...] = ("plain",)
    runs: dict[str, list[dict]] = field(default_factory=dict)  # by mode

    def name(self, mode: str) -> str:
        label = f"{'asyncpp' if self.kind == 'asyncpp' else 'vLLM 0.32'} P={self.pp}"
        return label if mode == "plain" else f"{label}, {mode} schema"


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
               "--structured-outputs-max-whitespace", "0", *args.asyncpp_args]
        return subprocess.Popen(cmd, cwd=REPO)
    cmd = [args.vllm_python, str(REPO / "benchmarks" / "vllm_cli.py"), "serve", str(model),
           "--served-model-name", DEFAULT_MODEL_NAME, "--port", str(port), "--dtype", "float32",
           "--pipeline-parallel-size", str(system.pp), "--max-model-len", "2048",
           "--no-enable-prefix-caching", "--no-enable-log-requests",
           "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]
    return subprocess.Popen(cmd, env=vllm_env(args.vllm_python, system.pp), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def load(url: str, model: Path, args: argparse.Namespace, num_prompts: int, out: Path, mode: str) -> dict:
    extra = MODES[mode] and {**MODES[mode], "max_tokens": args.output_len * 3 // 2 + 8}
    cmd = [args.vllm_python, str(REPO / "benchmarks" / "vllm_cli.py"), "bench", "serve", "--backend", "openai",
           "--base-url", url, "--endpoint", "/v1/completions", "--model", DEFAULT_MODEL_NAME,
           "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(num_prompts),
           "--max-concurrency", str(args.concurrency), "--seed", "0",
           "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
           *(["--ignore-eos"] if extra is None else ["--extra-body", json.dumps(extra), "--save-detailed"])]
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
        for mode in system.modes:
            load(url, model, args, args.concurrency // 4 or 1, workdir / f"warmup-{tag}-{mode}.json", mode)
            result = load(url, model, args, args.num_prompts, workdir / f"{tag}-{mode}.json", mode)
            run = {k: result[k] for k in METRICS}
            run["mean_output_len"] = result["total_output_tokens"] / max(1, result["completed"])
            run["valid"] = valid_share(result.get("generated_texts")) if mode == "json" else None
            system.runs.setdefault(mode, []).append(run)
            print(f"[serve_vs_vllm] {system.name(mode)} {tag}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in run.items() if v is not None), flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def valid_share(texts: list[str] | None) -> float:
    """The share of outputs that parse as JSON and validate against SCHEMA."""

    def valid(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    return sum(map(valid, texts or [])) / len(texts) if texts else 0.0


def table(systems: list[System]) -> str:
    lines = ["| system | out tok/s (runs) | TTFT p50 / p99 ms | ITL p50 / p99 ms | ITL p99 / p50 | out len | valid |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in systems:
        for mode, runs in s.runs.items():
            run = sorted(runs, key=lambda r: r["output_throughput"])[len(runs) // 2]
            all_runs = ", ".join(f"{r['output_throughput']:.1f}" for r in runs)
            valid = "" if run["valid"] is None else f"{100 * run['valid']:.0f}%"
            lines.append(f"| {s.name(mode)} | {run['output_throughput']:.1f} ({all_runs}) | "
                         f"{run['median_ttft_ms']:.0f} / {run['p99_ttft_ms']:.0f} | {run['median_itl_ms']:.0f} / "
                         f"{run['p99_itl_ms']:.0f} | {run['p99_itl_ms'] / run['median_itl_ms']:.2f} | "
                         f"{run['mean_output_len']:.0f} | {valid} |")
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
    parser.add_argument("--modes", default="plain", help="plain (ignore_eos, unconstrained) and/or json (every "
                                                          "request under a JSON schema)")
    parser.add_argument("--json", help="also write every run here")
    args, rest = parser.parse_known_args()
    args.asyncpp_args = [a for a in rest if a != "--"]
    model = bundled_model_path()
    modes = tuple(args.modes.split())
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    systems = [System(kind, int(layout[1:]), modes) for layout in args.layouts.split() for kind in args.systems.split()]
    with tempfile.TemporaryDirectory(prefix="serve-vs-vllm-") as tmp:
        for round_ in range(args.rounds):
            for system in systems:
                run_one(system, model, args, Path(tmp), f"{system.kind}-p{system.pp}-r{round_}")
    print(f"\n{args.num_prompts} requests, {args.concurrency} concurrent, {args.input_len} random prompt tokens, "
          f"{args.output_len} output tokens (plain: ignore_eos; json: up to, under the schema, temperature 1), fp32, "
          f"{DEFAULT_MODEL_NAME}; asyncpp flags: {' '.join(args.asyncpp_args) or '(defaults)'}\n")
    print(table(systems))
    if args.json:
        Path(args.json).write_text(json.dumps([{"system": s.name(mode), "runs": runs} for s in systems
                                               for mode, runs in s.runs.items()], indent=2))


if __name__ == "__main__":
    main()
