"""Session fixtures every test folder shares: the tiny checkpoints, the anyio backend, and
the check that no test leaves a process behind. Helpers live in `helpers/`."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import models
from helpers.processes import child_commands

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RENDERER = "template_renderer.py"


def _checkpoint(make: Callable[..., Path], folder: str, **kwargs: Any) -> Any:
    """A session fixture: the tiny checkpoint `make` writes into a fresh `folder`."""
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory) -> Path:
        return make(tmp_path_factory.mktemp(folder), **kwargs)
    return fixture


llama_dir = _checkpoint(models.make_llama, "tiny-llama")
# A vocabulary of 12: greedy output soon repeats itself, so n-gram proposals get accepted.
llama_v12_dir = _checkpoint(models.make_llama, "tiny-llama-v12", vocab=12)
# Draft models: the target's embeddings, first layer, norm and head.
llama_draft_dir = _checkpoint(models.make_llama_draft, "tiny-llama-draft")
llama_v12_draft_dir = _checkpoint(models.make_llama_draft, "tiny-llama-v12-draft", vocab=12)
gpt2_dir = _checkpoint(models.make_gpt2, "tiny-gpt2")
qwen2_dir = _checkpoint(models.make_llama, "tiny-qwen2", qkv_bias=True, tie=True)
qwen3_dir = _checkpoint(models.make_qwen3, "tiny-qwen3", tie=True)
qwen3_moe_dir = _checkpoint(models.make_qwen3_moe, "tiny-qwen3-moe")
mixtral_dir = _checkpoint(models.make_mixtral, "tiny-mixtral")
phi3_dir = _checkpoint(models.make_phi3, "tiny-phi3")
deepseek_v3_dir = _checkpoint(models.make_deepseek_v3, "tiny-deepseek-v3")
# The dense layout transformers writes (test_gpt_oss also writes the published MXFP4 one).
gpt_oss_dir = _checkpoint(models.make_gpt_oss, "tiny-gpt-oss")
mistral_swa_dir = _checkpoint(models.make_mistral_swa, "tiny-mistral-swa")  # every layer windowed: 40 tokens
qwen2_swa_dir = _checkpoint(models.make_qwen2_swa, "tiny-qwen2-swa")  # layers 2, 3 windowed (40), 0, 1 full
gemma3_dir = _checkpoint(models.make_gemma3, "tiny-gemma3")  # local (32-token window), local, global, local, local
gemma2_dir = _checkpoint(models.make_gemma2, "tiny-gemma2")  # local / global alternating; soft-capped logits


@pytest.fixture(params=["llama", "gpt2"])
def model_dir(request, llama_dir, gpt2_dir) -> Path:
    return {"llama": llama_dir, "gpt2": gpt2_dir}[request.param]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """No process a test started may outlive it (engines, stage workers, servers). A server a
    module shares starts its chat-template renderers at a test's first request template and
    keeps them: they end with its engine (tests/unit/test_template_sandbox.py checks that)."""
    before = set(child_commands())
    yield
    deadline = time.monotonic() + 10
    while (leaked := {p: c for p, c in child_commands().items() if p not in before and RENDERER not in c}) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leaked, f"processes outlived the test: {leaked}"

