"""Throughput benchmark: asyncpp layouts next to Hugging Face generate() and, when given an
interpreter that has it, vLLM, side by side in one run on the same token-id prompts, with a
greedy parity check of the token ids across every system.

    .venv/bin/python benchmarks/throughput.py --json bench-results/w.json --plot bench-results/w.png

`asyncpp bench` is the same run without the peers and the plot; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from asyncpp.bench import (  # noqa: E402
    BenchConfig,
    BenchReport,
    Peer,
    add_arguments,
    bench_config_from_args,
    emit_report,
    parse_layouts,
    run_benchmark,
)
from benchmarks.ceilings import ceiling_report, measure_ceilings  # noqa: E402
from benchmarks.peer_hf import HFPeer, add_speedup_vs_hf  # noqa: E402
from benchmarks.peer_vllm import VLLMPeer  # noqa: E402
from benchmarks.precision_quality import agreement_lines  # noqa: E402
from benchmarks.throughput_plot import write_plot  # noqa: E402


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    peers = parser.add_argument_group("peers and plot")
    peers.add_argument("--hf-requests", type=int, default=None,
                       help="time HF generate() on the first K requests only (0: skip HF; default all)")
    peers.add_argument("--hf-threads", type=int, default=None, help="torch threads for HF (default all cores)")
    peers.add_argument("--vllm-python", default=None,
                       help="also run vLLM on the same prompts, with this interpreter (a venv where vllm is "
                            "installed; vLLM pins its own torch and transformers); --repeats timed runs on one engine")
    peers.add_argument("--vllm-layouts", default="p1",
                       help="vLLM's rows: layouts as --layouts, only stages and dtype used, e.g. "
                            "'p1/fp32 p1/bf16 p2/fp32 p2/bf16'")
    peers.add_argument("--ceilings", action="store_true",
                       help="measure the machine's GEMM and memory ceilings in this run and show each row "
                            "as a fraction of its ceiling (benchmarks/ceilings.py)")
    peers.add_argument("--plot", dest="plot_out", default=None, help="write a PNG plot here (needs matplotlib)")


def build_peers(ns: argparse.Namespace) -> list[Peer]:
    """vLLM first, then HF: the order of the table's rows after the asyncpp layouts."""
    vllm = parse_layouts(ns.vllm_layouts) if ns.vllm_python else []
    peers: list[Peer] = [VLLMPeer(ns.vllm_python, layout) for layout in vllm]
    if ns.hf_requests != 0:
        peers.append(HFPeer(ns.hf_requests, ns.hf_threads))
    return peers


def run(cfg: BenchConfig, peers: list[Peer], log: Callable[[str], Any] = print) -> BenchReport:
    """The package's bench run with the peers, plus each row's speedup over HF."""
    report = run_benchmark(cfg, log=log, peers=peers)
    add_speedup_vs_hf(report.results)
    hf = next((p for p in peers if isinstance(p, HFPeer)), None)
    report.config["hf_requests"] = hf.count(cfg.num_requests) if hf else 0
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="throughput", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    add_peer_arguments(parser)
    ns = parser.parse_args(argv)
    cfg = bench_config_from_args(ns)
    ceilings = measure_ceilings() if ns.ceilings else None
    report = run(cfg, build_peers(ns))
    report.notes += agreement_lines(report.results)
    if ceilings is not None:
        report.notes.append(ceiling_report(ceilings, report, cfg))
    status = emit_report(report, ns.json_out)
    if ns.plot_out:
        print(write_plot(report, ns.plot_out))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
