"""Fixtures of the integration tests: the HTTP tests' servers, one per engine setting for
the session, the fixture tokenizer they serve with, and the offline LLM's reference answers."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncpp import LLM, ChatPrompt, SamplingParams
from asyncpp.testing.tiny_tokenizer import make_tokenizer
from helpers.fake_engine import LAYOUTS
from helpers.http_server import CHAT_MESSAGES, COMPLETION_PROMPT, MAX_MODEL_LEN, MAX_TOKENS, ServerPool


@pytest.fixture(params=list(LAYOUTS))
def layout(request) -> dict[str, Any]:
    """The fake-runner tests' layouts: P = 1 in-process, P = 2 in stage processes."""
    return LAYOUTS[request.param]


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
        completion, chat = llm.generate([COMPLETION_PROMPT, ChatPrompt(CHAT_MESSAGES)], params)
    assert chat.prompt_token_ids == chat_ids and chat.prompt == chat_text  # the SDK renders as transformers
    return {"completion": completion.outputs[0].text, "completion_ids": completion.outputs[0].token_ids,
            "completion_prompt_ids": completion.prompt_token_ids,
            "chat": chat.outputs[0].text, "chat_prompt_ids": chat_ids}
