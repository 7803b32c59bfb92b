"""POST /v1/completions: plain and streamed `text_completion` objects."""
from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import Response

from asyncpp.core.outputs import CompletionOutput
from asyncpp.server.logprobs import completion_logprobs
from asyncpp.server.protocol import CompletionRequest, Prompt
from asyncpp.server.serving import ResponseShape, ServerState, respond


class CompletionShape(ResponseShape):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"
    body: CompletionRequest

    def content(self, text: str, chunk: bool) -> dict:
        return {"text": text}

    def logprobs(self, c: CompletionOutput, text: str, first_token: int) -> dict | None:
        if self.body.logprobs is None or c.logprobs is None:
            return None
        return completion_logprobs(c.token_ids[first_token:], c.logprobs[first_token:], self.body.logprobs,
                                   self.state.engine.tokenizer, text_offset=len(c.text) - len(text))


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    prompts = body.prompts()
    state.limits.check_prompt_count(len(prompts))
    state.limits.check_n(body.n)
    state.limits.check_logprobs(body.logprobs, "logprobs")
    return await respond(state, request, body, await tokenized(state, prompts), CompletionShape(state, body))


async def tokenized(state: ServerState, prompts: list[Prompt]) -> list[Prompt | dict]:
    """Text prompts as {"prompt", "prompt_token_ids"}, tokenized in a worker thread as the engine
    would (it would on the event loop); too long a text is refused before."""
    tokenizer = state.engine.tokenizer
    if tokenizer is None or not any(isinstance(p, str) for p in prompts):
        return list(prompts)  # the engine answers text without a tokenizer with a 400
    for p in prompts:
        if isinstance(p, str):
            state.limits.check_text(p, "prompt")

    def encode_all() -> list[Prompt | dict]:
        return [{"prompt": p, "prompt_token_ids": tokenizer.encode(p)} if isinstance(p, str) else p
                for p in prompts]

    return await anyio.to_thread.run_sync(encode_all)
