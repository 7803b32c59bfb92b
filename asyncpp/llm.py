"""LLM: the synchronous, offline face of AsyncLLM.

The async engine runs on its own event loop in a background thread (an anyio blocking
portal), so LLM works from plain scripts and from inside an already running loop
(Jupyter) alike.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import anyio
from anyio.from_thread import start_blocking_portal

from asyncpp.async_llm import AsyncLLM
from asyncpp.chat_template import template_message
from asyncpp.core.outputs import RequestOutput
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine.request_stream import RequestStream
from asyncpp.engine_args import EngineArgs
from asyncpp.prompts import ChatPrompt, PromptInput


class LLM:
    def __init__(self, model: str | None = None, **engine_kwargs: Any):
        engine_kwargs.setdefault("max_waiting_requests", 1 << 30)  # offline batches queue it all
        # Nobody watches tokens stream offline: prompts may take the whole microbatch budget
        # while others decode (faster batches), instead of the serving default that keeps
        # each stream's inter-token latency down.
        engine_kwargs.setdefault("max_prefill_tokens_while_decoding", 1 << 30)
        self._portal_cm = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        try:
            self._engine_cm = self._portal.wrap_async_context_manager(
                AsyncLLM(engine_args=EngineArgs(model=model, **engine_kwargs)))
            self.engine: AsyncLLM = self._engine_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        # Not __del__: the portal's loop runs in a daemon thread, which is gone by the time
        # an interpreter's last references are dropped; a finalizer also runs at exit, first.
        self._finalizer = weakref.finalize(self, _close, self._engine_cm, self._portal_cm)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of the prompts."""
        if not self._finalizer.alive:
            raise RuntimeError("this LLM was shut down")
        prompt_list = [prompts] if _is_single(prompts) else list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts")
        return self._portal.call(self._run_all, prompt_list, params_list)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """vLLM's offline chat: one conversation (a list of messages) or several, each rendered with
        the chat template (the tokenizer's, or `chat_template`), `tools` given to the template;
        then as `generate`. Constrained output (`SamplingParams(structured_outputs=...)`) applies
        to the reply as it does to a plain prompt."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [ChatPrompt([template_message(m) for m in conversation], add_generation_prompt, chat_template,
                              dict(chat_template_kwargs or {}), tools=tools)
                   for conversation in conversations]
        return self.generate(prompts, sampling_params)

    async def _run_all(self, prompts: list[PromptInput], params: list[SamplingParams]) -> list[RequestOutput]:
        streams: list[RequestStream] = []
        results: list[RequestOutput | None] = [None] * len(prompts)
        errors: list[Exception] = []

        async def drain(i: int) -> None:
            try:
                async for out in streams[i]:
                    results[i] = out
            except Exception as e:  # one engine failure fails every request: report it once
                errors.append(e)

        try:
            for p, sp in zip(prompts, params):  # all or none: a refused prompt aborts the others
                streams.append(await self.engine.add_request(p, sp))
            async with anyio.create_task_group() as tg:
                for i in range(len(streams)):
                    tg.start_soon(drain, i)
        finally:
            for s in streams:
                s.close()
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]

    def shutdown(self) -> None:
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _close(engine_cm: AbstractContextManager[Any], portal_cm: AbstractContextManager[Any]) -> None:
    try:
        engine_cm.__exit__(None, None, None)
    finally:
        portal_cm.__exit__(None, None, None)


def _is_single(prompts: Any) -> bool:
    if isinstance(prompts, (str, dict, ChatPrompt)):
        return True
    return isinstance(prompts, (list, tuple)) and bool(prompts) and isinstance(prompts[0], int)
