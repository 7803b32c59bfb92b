"""`asyncpp bench`: asyncpp's own throughput and latency on a workload, layout by layout.

workload.py builds the model and prompts, layout.py names the layouts, engine_run.py times
one layout, runner.py runs them all (and any peers handed in), results.py, trace.py and
parity.py hold the rows and their checks, table.py prints them, cli.py is the command.
The comparison with other systems (Hugging Face generate(), vLLM) and the plot live in
benchmarks/throughput.py, which reuses this package.
"""
from asyncpp.bench.cli import add_arguments, add_bench_parser, bench_config_from_args, emit_report, run_bench
from asyncpp.bench.layout import DEFAULT_LAYOUTS, Layout, parse_layout, parse_layouts
from asyncpp.bench.parity import check_parity
from asyncpp.bench.results import SystemResult, add_ratio_vs_p1, median_run, summarize
from asyncpp.bench.runner import BenchConfig, BenchReport, Peer, Workload, run_benchmark
from asyncpp.bench.table import format_report, format_table
from asyncpp.bench.trace import RequestTrace, percentile_ms
from asyncpp.bench.workload import default_workload_dir, make_prompts, make_workload_model

__all__ = ["BenchConfig", "BenchReport", "DEFAULT_LAYOUTS", "Layout", "Peer", "RequestTrace", "SystemResult",
           "Workload", "add_arguments", "add_bench_parser", "add_ratio_vs_p1", "bench_config_from_args",
           "check_parity", "default_workload_dir", "emit_report", "format_report", "format_table",
           "make_prompts", "make_workload_model", "median_run", "parse_layout", "parse_layouts",
           "percentile_ms", "run_bench", "run_benchmark", "summarize"]
