"""Throughput benchmark: asyncpp layouts vs Hugging Face generate(), side by side in one run.

    .venv/bin/python benchmarks/throughput.py --json bench-results/w.json

Same program as `asyncpp bench`; see benchmarks/README.md for the columns.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from asyncpp.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
