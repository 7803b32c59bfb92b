"""The HTTP layer installs as `asyncpp.server`: it runs as `python -m asyncpp.server`, and no
top-level `server` module is installed. Run outside the repository, whose root holds server/.
A model the engine cannot run is refused before any stage starts: one line from `serve`, a
ValueError from the SDK."""
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


def _unsupported_model(path: Path) -> Path:
    """A config-only Mistral folder with an MLP activation the engine does not build (no
    weights: a stage that started would fail on them)."""
    from transformers import MistralConfig

    MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, hidden_act="relu",
                  architectures=["MistralForCausalLM"]).save_pretrained(path)
    return path


@pytest.mark.parametrize("module", [["asyncpp.server"], ["asyncpp", "serve"]], ids=" ".join)
def test_serve_refuses_an_unsupported_model_in_one_line(module, tmp_path):
    model = _unsupported_model(tmp_path / "mistral")
    result = _python(["-m", *module, str(model), "--pipeline-parallel-size", "2"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "error: MistralForCausalLM: hidden_act 'relu' is not supported (the MLP is SwiGLU: silu)")


def test_sdk_refuses_an_unsupported_model_before_any_stage_starts(tmp_path):
    from asyncpp import LLM, AsyncLLM

    model = _unsupported_model(tmp_path / "mistral")
    for make in (LLM, AsyncLLM):
        with pytest.raises(ValueError, match=r"^MistralForCausalLM: hidden_act 'relu' is not supported"):
            make(str(model), pipeline_parallel_size=2, distributed_executor_backend="mp")
    config = model / "config.json"
    config.write_text(config.read_text().replace("MistralForCausalLM", "FancyForCausalLM"))
    with pytest.raises(ValueError, match=r"unsupported model architecture \['FancyForCausalLM'\]"):
        AsyncLLM(str(model))
