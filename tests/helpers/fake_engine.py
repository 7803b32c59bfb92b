"""An AsyncLLM on the tiny Llama's config whose stages run the fake runner (fake_runner.py),
and the small calls the fake-runner tests share."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from asyncpp import AsyncLLM, SamplingParams
from asyncpp.core.outputs import RequestOutput
from helpers.fake_runner import fake_runner_factory

LAYOUTS = {"P1-uni": {}, "P2-mp": {"pipeline_parallel_size": 2}}  # the `layout` fixture's (integration/conftest.py)


def fake_engine(model_dir: Path, **overrides: Any) -> AsyncLLM:
    """The tiny Llama's config (its vocabulary, EOS and layer count), the fake runner's tokens."""
    settings = {"skip_tokenizer_init": True, "dtype": "float32", "device": "cpu", "max_model_len": 256,
                "kv_cache_memory": "4MiB"} | overrides
    return AsyncLLM(str(model_dir), runner_factory=fake_runner_factory, **settings)


def counting(max_tokens: int | None, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kwargs)


async def stream(llm: AsyncLLM, prompt: list[int], params: SamplingParams,
                 request_id: str | None = None) -> list[RequestOutput]:
    return [out async for out in llm.generate({"prompt_token_ids": prompt}, params, request_id)]


async def all_finals(llm: AsyncLLM, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
    """Every prompt streamed at once; each one's final output, in the prompts' order."""
    finals: list[Any] = [None] * len(prompts)

    async def run(i: int) -> None:
        finals[i] = (await stream(llm, prompts[i], params))[-1]

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(run, i)
    return finals


async def abort_each_after_three(llm: AsyncLLM, prompts: list[list[int]],
                                 params: SamplingParams | None = None) -> list[RequestOutput]:
    """Each prompt streamed at once with no length limit (or `params`) and aborted at its third
    output (KV blocks held then); each one's last output."""
    finals: list[Any] = [None] * len(prompts)

    async def run(i: int) -> None:
        seen = 0
        async for out in llm.generate({"prompt_token_ids": prompts[i]}, params or counting(None), f"r{i}"):
            seen += 1
            if seen == 3:
                assert llm.stats().kv_blocks_used > 0
                assert await llm.abort(f"r{i}")
            finals[i] = out

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(run, i)
    return finals


def assert_idle(llm: AsyncLLM) -> None:
    stats = llm.stats()
    assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0), stats
