"""Session fixtures every test folder shares: the tiny checkpoints, the anyio backend, and
the check that no test leaves a process behind. Helpers live in `helpers/`."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import models
from helpers.processes import child_commands

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RENDERER = "template_renderer.py"


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return models.make_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return models.make_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return models.make_llama(tmp_path_factory.mktemp("tiny-qwen2"), qkv_bias=True, tie=True)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    return models.make_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), tie=True)


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory) -> Path:
    return models.make_qwen3_moe(tmp_path_factory.mktemp("tiny-qwen3-moe"))


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory) -> Path:
    return models.make_mixtral(tmp_path_factory.mktemp("tiny-mixtral"))


@pytest.fixture(scope="session")
def phi3_dir(tmp_path_factory) -> Path:
    return models.make_phi3(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(scope="session")
def deepseek_v3_dir(tmp_path_factory) -> Path:
    return models.make_deepseek_v3(tmp_path_factory.mktemp("tiny-deepseek-v3"))


@pytest.fixture(scope="session")
def gpt_oss_dir(tmp_path_factory) -> Path:
    """The dense layout transformers writes (test_gpt_oss also writes the published MXFP4 one)."""
    return models.make_gpt_oss(tmp_path_factory.mktemp("tiny-gpt-oss"))


@pytest.fixture(scope="session")
def mistral_swa_dir(tmp_path_factory) -> Path:
    """Every layer windowed: 40 tokens."""
    return models.make_mistral_swa(tmp_path_factory.mktemp("tiny-mistral-swa"))


@pytest.fixture(scope="session")
def qwen2_swa_dir(tmp_path_factory) -> Path:
    """Layers 2 and 3 windowed (40 tokens), 0 and 1 full."""
    return models.make_qwen2_swa(tmp_path_factory.mktemp("tiny-qwen2-swa"))


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory) -> Path:
    """Local (32-token window), local, global, local, local."""
    return models.make_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def gemma2_dir(tmp_path_factory) -> Path:
    """Local (32-token window) and global layers alternating; soft-capped logits."""
    return models.make_gemma2(tmp_path_factory.mktemp("tiny-gemma2"))


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

