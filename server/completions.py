"""POST /v1/completions: plain and streamed `text_completion` objects."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from asyncpp.core.outputs import CompletionOutput, RequestOutput
from asyncpp.server.errors import ServerError
from asyncpp.server.logprobs import completion_logprobs, prompt_logprobs
from asyncpp.server.protocol import CompletionRequest, Prompt
from asyncpp.server.serving import ResponseShape, ServerState, respond


class CompletionShape(ResponseShape):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"
    body: CompletionRequest

    def content(self, index: int, out: RequestOutput, c: CompletionOutput, text: str, chunk: bool) -> dict:
        return {"text": text}

    def logprobs(self, c: CompletionOutput, text: str, first_token: int) -> dict | None:
        if self.body.logprobs is None or c.logprobs is None:
            return None
        return completion_logprobs(c.token_ids[first_token:], c.logprobs[first_token:], self.body.logprobs,
                                   self.state.engine.tokenizer, text_offset=len(c.text) - len(text))


    def whole(self, outs: list[RequestOutput]) -> dict[str, Any]:
        response = super().whole(outs)
        if self.body.prompt_logprobs is not None:  # vLLM's: in each choice, its prompt's
            for choice in response["choices"]:
                choice["prompt_logprobs"] = prompt_logprobs(outs[choice["index"] // self.body.n].prompt_logprobs)
        return response


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    prompts = body.prompts()
    check_prompt_count(len(prompts), state.engine.config.max_waiting_requests)
    return await respond(state, request, body, [engine_prompt(p, body.cache_salt) for p in prompts],
                         CompletionShape(state, body))


def check_prompt_count(count: int, max_waiting_requests: int) -> None:
    """One body's prompts go in all at once: more than the waiting queue holds could never start."""
    if count > max_waiting_requests:
        raise ServerError(400, f"prompt holds {count} prompts, more than this server's waiting queue "
                               f"(--max-waiting-requests {max_waiting_requests}) can ever hold", "prompt")


def engine_prompt(prompt: Prompt, cache_salt: str | None) -> dict:
    """The engine's (vLLM's) dict form of one prompt of the body."""
    key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
    return {key: prompt} if cache_salt is None else {key: prompt, "cache_salt": cache_salt}
