"""`asyncpp bench`: its flags, and printing or saving a report. benchmarks/throughput.py
adds the peers' flags to the same parser."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from asyncpp.bench.layout import DEFAULT_LAYOUTS, parse_layouts
from asyncpp.bench.runner import BenchConfig, BenchReport, run_benchmark
from asyncpp.bench.table import format_report
from asyncpp.bench.workload import WORKLOADS
from asyncpp.engine_args import EngineArgs

DESCRIPTION = """Throughput and latency of asyncpp layouts, side by side in one run, on the same
token-id prompts, with a greedy parity check across layouts. Without MODEL: workload W, a
random 8-layer Llama built once in the asyncpp cache ($ASYNCPP_CACHE_DIR), or with
--workload moe its Mixture-of-Experts twin, a random 8-layer Qwen3-MoE (16 experts, top-2).
Peers (Hugging Face generate(), vLLM) and plots: benchmarks/throughput.py in a checkout."""

_LAYOUT_FIELDS = ("pipeline_parallel_size", "tensor_parallel_size", "num_virtual_engines")
_BENCH_FIXED_FIELDS = ("model", "skip_tokenizer_init")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=list(WORKLOADS), default="w",
                        help="the model when no MODEL is given: w (a random 8-layer Llama, hidden 512) or moe "
                             "(a random 8-layer Qwen3-MoE, hidden 512, 16 experts of 512, top-2), built once in the "
                             "asyncpp cache")
    parser.add_argument("--num-requests", type=int, default=32, help="requests, all submitted at once")
    parser.add_argument("--min-prompt-len", type=int, default=64, help="shortest prompt (tokens)")
    parser.add_argument("--max-prompt-len", type=int, default=256, help="longest prompt (tokens)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (ignore_eos)")
    parser.add_argument("--bench-seed", type=int, default=0, help="seed of the prompt lengths and ids")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                        help="asyncpp layouts, e.g. 'p1 p2v2 p2v1 t2 p2t2 p2v2@5,3' (p: stages, t: TP, v: virtual "
                             "engines, @: layers per stage); they set --pipeline-parallel-size, "
                             "--tensor-parallel-size, --num-virtual-engines")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each layout (rounds interleaved); each row is the median run, and "
                             "every run's tok/s is listed below the table")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    engine = parser.add_argument_group("engine arguments (MODEL default: workload W, built once in the cache)")
    EngineArgs.add_cli_args(engine)


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="throughput/latency of asyncpp layouts, side by side",
                                   description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run_bench)
    return parser


def bench_config_from_args(ns: argparse.Namespace) -> BenchConfig:
    args = EngineArgs.from_cli_args(ns)
    defaults = EngineArgs()
    engine_kwargs = {f.name: getattr(args, f.name) for f in fields(args)
                     if f.name not in _LAYOUT_FIELDS + _BENCH_FIXED_FIELDS
                     and getattr(args, f.name) != getattr(defaults, f.name)}
    cfg = BenchConfig(model=args.model, workload=ns.workload, num_requests=ns.num_requests,
                      min_prompt_len=ns.min_prompt_len, max_prompt_len=ns.max_prompt_len,
                      output_len=ns.output_len, seed=ns.bench_seed, layouts=parse_layouts(ns.layouts),
                      repeats=ns.repeats, engine_kwargs=engine_kwargs)
    _check(cfg)
    return cfg


def _check(cfg: BenchConfig) -> None:
    if cfg.repeats < 1:
        raise SystemExit("bench: need --repeats >= 1")
    if cfg.model and cfg.workload != "w":
        raise SystemExit(f"bench: --workload {cfg.workload} builds its own model; give MODEL or --workload, not both")
    if cfg.num_requests < 1 or cfg.output_len < 1 or not 1 <= cfg.min_prompt_len <= cfg.max_prompt_len:
        raise SystemExit("bench: need --num-requests >= 1, --output-len >= 1 and "
                         "1 <= --min-prompt-len <= --max-prompt-len")


def emit_report(report: BenchReport, json_out: str | None) -> int:
    """Prints the report, writes its JSON when asked; the exit status is 1 on a parity mismatch."""
    print(format_report(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report.to_json(), indent=2))
        print(f"results written to {json_out}")
    return 1 if report.parity else 0


def run_bench(ns: argparse.Namespace) -> int:
    return emit_report(run_benchmark(bench_config_from_args(ns)), ns.json_out)
