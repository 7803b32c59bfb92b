"""The HTTP layer installs as `asyncpp.server`: it runs as `python -m asyncpp.server`, and no
top-level `server` module is installed. Run outside the repository, whose root holds server/."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", [["asyncpp.server"], ["asyncpp", "serve"]], ids=" ".join)
def test_serve_help(module, tmp_path):
    result = _python(["-m", *module, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--pipeline-parallel-size" in result.stdout and "--api-key" in result.stdout


def test_no_top_level_server_module(tmp_path):
    result = _python(["-c", "import asyncpp.server; import server"], tmp_path)
    assert result.returncode == 1 and "No module named 'server'" in result.stderr, result.stderr
