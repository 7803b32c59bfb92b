"""POST /v1/chat/completions: plain or streamed `chat.completion` objects (streamed: the
assistant role first, then content deltas). The engine renders the chat template."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from asyncpp.chat_template import request_template
from asyncpp.core.outputs import CompletionOutput, RequestOutput
from asyncpp.prompts import ChatPrompt
from asyncpp.server.errors import ServerError
from asyncpp.server.logprobs import chat_logprobs, prompt_logprobs
from asyncpp.server.protocol import ChatCompletionRequest, ChatMessage
from asyncpp.server.serving import ResponseShape, ServerState, respond


class ChatShape(ResponseShape):
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"
    field_names = {"logprobs": "top_logprobs"}  # SamplingParams.logprobs comes from top_logprobs here
    body: ChatCompletionRequest

    def content(self, text: str, chunk: bool) -> dict:
        return {"delta": {"content": text}} if chunk else {"message": {"role": "assistant", "content": text}}

    def logprobs(self, c: CompletionOutput, text: str, first_token: int) -> dict | None:
        if not self.body.logprobs or c.logprobs is None:
            return None
        return chat_logprobs(c.token_ids[first_token:], c.logprobs[first_token:], self.body.top_logprobs or 0,
                             self.state.engine.tokenizer)

    def whole(self, outs: list[RequestOutput]) -> dict[str, Any]:
        response = super().whole(outs)
        if self.body.prompt_logprobs is not None:  # vLLM's: beside the choices
            response["prompt_logprobs"] = prompt_logprobs(outs[0].prompt_logprobs)
        return response

    def opening_choices(self, num_choices: int) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(num_choices)]


def chat_prompt(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True,
                template: str | None = None, template_kwargs: dict | None = None,
                cache_salt: str | None = None) -> ChatPrompt:
    """The engine's chat input; a template the request brings only with --trust-request-chat-template."""
    kwargs = template_kwargs or {}
    if request_template(template, kwargs) is not None and not state.settings.trust_request_chat_template:
        param = "chat_template" if template is not None else "chat_template_kwargs"
        raise ServerError(400, f"{param}: this server does not render chat templates sent with the request; "
                               "its operator can allow them with --trust-request-chat-template", param)
    return ChatPrompt([m.template_dict() for m in messages], add_generation_prompt, template, kwargs, cache_salt,
                      state.settings.chat_template_timeout_s)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    prompt = chat_prompt(state, body.messages, body.add_generation_prompt, body.chat_template,
                         body.chat_template_kwargs, body.cache_salt)
    return await respond(state, request, body, [prompt], ChatShape(state, body))
