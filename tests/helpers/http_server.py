"""Servers for the HTTP tests: the tiny Llama with the fixture tokenizer, served by uvicorn
in a background thread on a free loopback port, one per engine setting, for the session
(the fixtures that hold them are in integration/conftest.py)."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from asyncpp.engine_args import EngineArgs
from asyncpp.server.app import build_app
from asyncpp.server.threaded import serve_in_thread
from asyncpp.testing.live_server import LiveServer

API_KEY = "test-key"
MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 256
MAX_TOKENS = 16
COMPLETION_PROMPT = "San Francisco is a"
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def engine_args(model_dir: Path, tok_dir: Path, **overrides: Any) -> EngineArgs:
    settings = {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "kv_cache_memory": "64MiB"} | overrides
    return EngineArgs(model=str(model_dir), tokenizer=str(tok_dir), served_model_name=MODEL_NAME, **settings)


@dataclass(slots=True)
class RunningServer(LiveServer):
    """The plugin's live server (engine, wait_idle), with the clients these tests use."""

    def http(self, api_key: str | None = API_KEY, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def openai(self) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


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
