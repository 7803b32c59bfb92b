"""Servers for the HTTP tests: the tiny Llama with the fixture tokenizer, served by uvicorn
in a background thread on a free loopback port, one per engine setting, for the session.

Import the fixtures into a test module: `from http_fixtures import (server_pool, ...)`."""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from asyncpp import LLM, SamplingParams
from asyncpp.async_llm import AsyncLLM
from asyncpp.config import EngineArgs
from asyncpp.server.app import build_app
from asyncpp.server.threaded import serve_in_thread
from asyncpp.testing.tiny_tokenizer import make_tokenizer

API_KEY = "test-key"
MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 256
MAX_TOKENS = 16
COMPLETION_PROMPT = "San Francisco is a"
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def engine_args(model_dir: Path, tok_dir: Path, **overrides: Any) -> EngineArgs:
    settings = dict(dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_memory="64MiB") | overrides
    return EngineArgs(model=str(model_dir), tokenizer=str(tok_dir), served_model_name=MODEL_NAME, **settings)


@dataclass(slots=True)
class RunningServer:
    url: str
    app: Starlette

    @property
    def engine(self) -> AsyncLLM:
        return self.app.state.server.engine

    def http(self, api_key: str | None = API_KEY, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def openai(self) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def wait_idle(self, timeout_s: float = 30) -> Any:
        """Engine stats once nothing runs and no KV block is held (fails after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.engine.stats()
            if stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout_s} s: {stats}")
            time.sleep(0.05)


class ServerPool:
    """One running server per distinct engine setting, all shut down at the end."""

    def __init__(self, model_dir: Path, tok_dir: Path):
        self.model_dir, self.tok_dir = model_dir, tok_dir
        self._servers: dict[tuple, RunningServer] = {}
        self._stack = ExitStack()

    def get(self, **overrides: Any) -> RunningServer:
        key = tuple(sorted(overrides.items()))
        if key not in self._servers:
            app = build_app(engine_args(self.model_dir, self.tok_dir, **overrides), api_key=API_KEY)
            self._servers[key] = RunningServer(self._stack.enter_context(serve_in_thread(app)), app)
        return self._servers[key]

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def server_pool(llama_dir, tok_dir):
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
