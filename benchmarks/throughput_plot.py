"""benchmarks/throughput.py's PNG: tokens/s and inter-token latency per system."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from asyncpp.bench import BenchReport


def write_plot(report: BenchReport, path: str | Path) -> str:
    if importlib.util.find_spec("matplotlib") is None:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib) — {path} not written"
    # matplotlib is optional: imported only once it is known to be installed.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report.results if r.ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.name for r in ok]
    left.bar(names, [r.tokens_per_s for r in ok], color="tab:blue")
    left.set_ylabel("output tokens/s")
    left.set_title("throughput")
    right.bar(names, [r.itl_p50_ms or 0 for r in ok], color="tab:orange", label="ITL p50")
    right.scatter(names, [r.itl_p99_ms or 0 for r in ok], color="black", zorder=3, label="ITL p99")
    right.set_ylabel("ms")
    right.set_title("inter-token latency")
    right.legend()
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"
