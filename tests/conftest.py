"""Session fixtures every test folder shares: the tiny checkpoints, the anyio backend, and
the check that no test leaves a process behind. Helpers live in `helpers/`."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncpp import LLM, SamplingParams
from helpers.models import make_gpt2, make_llama
from helpers.processes import child_commands
from helpers.http_server import CHAT_MESSAGES, COMPLETION_PROMPT, MAX_MODEL_LEN, MAX_TOKENS, ServerPool
from helpers.tokenizer import make_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny-qwen2"), qkv_bias=True, tie=True)


@pytest.fixture(params=["llama", "gpt2"])
def model_dir(request, llama_dir, gpt2_dir) -> Path:
    return {"llama": llama_dir, "gpt2": gpt2_dir}[request.param]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """No process a test started may outlive it (engines, stage workers, servers)."""
    before = set(child_commands())
    yield
    deadline = time.monotonic() + 10
    while (leaked := {p: c for p, c in child_commands().items() if p not in before}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leaked, f"processes outlived the test: {leaked}"


# -- the HTTP tests' servers ---------------------------------------------------------------
@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def server_pool(llama_dir, tok_dir) -> Iterator[ServerPool]:
    pool = ServerPool(llama_dir, tok_dir)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def reference(llama_dir, tok_dir) -> dict[str, Any]:
    """What asyncpp's offline LLM gives for the tests' greedy requests (ignore_eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    chat_text = tokenizer.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    chat_ids = tokenizer.encode(chat_text, add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(str(llama_dir), tokenizer=str(tok_dir), dtype="float32", max_model_len=MAX_MODEL_LEN,
             kv_cache_memory="64MiB") as llm:
        completion, chat = llm.generate([COMPLETION_PROMPT, {"prompt_token_ids": chat_ids}], params)
    return {"completion": completion.outputs[0].text, "completion_ids": completion.outputs[0].token_ids,
            "completion_prompt_ids": completion.prompt_token_ids,
            "chat": chat.outputs[0].text, "chat_prompt_ids": chat_ids}
