"""POST /v1/completions: plain and streamed `text_completion` objects."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from asyncpp.core.outputs import CompletionOutput
from asyncpp.server.logprobs import completion_logprobs
from asyncpp.server.protocol import CompletionRequest
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
    return await respond(state, request, body, body.prompts(), CompletionShape(state, body))
