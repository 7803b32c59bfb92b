"""The bench report as text: the table of systems, notes, repeated runs and the parity verdict."""
from __future__ import annotations

from collections.abc import Callable

from asyncpp.bench.parity import EXACT_PRECISIONS
from asyncpp.bench.results import SystemResult
from asyncpp.bench.runner import BenchReport

Column = tuple[str, Callable[[SystemResult], str]]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _busy(r: SystemResult) -> str:
    return "/".join(f"{b:.2f}" for b in r.busy_fractions) if r.busy_fractions else "-"


_COLUMNS: list[Column] = [
    ("system", lambda r: r.name),
    ("reqs", lambda r: str(r.requests)),
    ("out tok", lambda r: str(r.output_tokens)),
    ("total s", lambda r: f"{r.total_s:.2f}"),
    ("tok/s", lambda r: f"{r.tokens_per_s:.1f}"),
    ("TTFT p50 ms", lambda r: _fmt(r.ttft_p50_ms, ".1f")),
    ("TTFT p99 ms", lambda r: _fmt(r.ttft_p99_ms, ".1f")),
    ("ITL p50 ms", lambda r: _fmt(r.itl_p50_ms, ".2f")),
    ("ITL p99 ms", lambda r: _fmt(r.itl_p99_ms, ".2f")),
    ("vs HF", lambda r: _fmt(r.speedup_vs_hf, ".2f", "x")),
    ("vs P=1", lambda r: _fmt(r.ratio_vs_p1, ".2f")),
    ("layers", lambda r: r.layers or "-"),
    ("weights MiB", lambda r: "/".join(f"{m:.0f}" for m in r.stage_weight_mib) if r.stage_weight_mib else "-"),
    ("stage busy", _busy),
    ("bubble", lambda r: _fmt(r.bubble_fraction, ".2f")),
    ("in flight mean/max", lambda r: f"{r.in_flight[0]:.2f}/{r.in_flight[1]}" if r.in_flight else "-"),
]


def _columns(results: list[SystemResult]) -> list[Column]:
    """Every column, less "vs HF" when no Hugging Face row ran (`asyncpp bench` alone)."""
    with_hf = any(r.speedup_vs_hf is not None for r in results)
    return [c for c in _COLUMNS if with_hf or c[0] != "vs HF"]


def format_table(results: list[SystemResult]) -> str:
    columns = _columns(results)
    rows = [[header for header, _ in columns]]
    for r in results:
        cells = [cell(r) for _, cell in columns] if r.ok else [r.name, "skipped"] + [""] * (len(columns) - 2)
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_report(report: BenchReport) -> str:
    c = report.config
    lines = [f"model {c['model']}; {c['num_requests']} requests, prompt {c['prompt_len'][0]}..{c['prompt_len'][1]} "
             f"tokens, {c['output_len']} output tokens, greedy, ignore_eos; {c['cores']} cores, torch {c['torch']}",
             *([f"engine arguments for every layout: {c['engine_kwargs']}"] if c["engine_kwargs"] else []),
             "", format_table(report.results), ""]
    lines += [f"note: {n}" for n in report.notes]
    lines += [f"runs: {r.name}: " + ", ".join(f"{x:.1f}" for x in r.runs_tok_s) + " tok/s (median shown)"
              for r in report.results if len(r.runs_tok_s) > 1]
    return "\n".join(lines + _parity_lines(report))


def _parity_lines(report: BenchReport) -> list[str]:
    if not report.parity:
        checked = [r.name for r in report.results if r.ok and r.precision in EXACT_PRECISIONS]
        if not checked:
            return ["parity: no fp32 rows to compare"]
        return [f"parity: identical greedy token ids across {', '.join(checked)}"]
    bar = "!" * 72
    return [bar, "!!! GREEDY PARITY MISMATCH: outputs differ between systems !!!",
            *(f"!!! {p}" for p in report.parity), bar]
