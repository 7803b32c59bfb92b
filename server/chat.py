"""POST /v1/chat/completions: the chat template, then plain or streamed `chat.completion`
objects (streamed: the assistant role first, then content deltas)."""
from __future__ import annotations

from typing import Any

import anyio
from jinja2 import TemplateError
from starlette.requests import Request
from starlette.responses import Response

from asyncpp.core.outputs import CompletionOutput
from asyncpp.server.chat_template import RenderTimeout, check_template_request, render_chat
from asyncpp.server.errors import ServerError
from asyncpp.server.logprobs import chat_logprobs
from asyncpp.server.protocol import ChatCompletionRequest, ChatMessage
from asyncpp.server.serving import ResponseShape, ServerState, respond


class ChatShape(ResponseShape):
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"
    body: ChatCompletionRequest

    def content(self, text: str, chunk: bool) -> dict:
        return {"delta": {"content": text}} if chunk else {"message": {"role": "assistant", "content": text}}

    def logprobs(self, c: CompletionOutput, text: str, first_token: int) -> dict | None:
        if not self.body.logprobs or c.logprobs is None:
            return None
        return chat_logprobs(c.token_ids[first_token:], c.logprobs[first_token:], self.body.top_logprobs or 0,
                             self.state.engine.tokenizer)

    def opening_choices(self, num_choices: int) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(num_choices)]


async def chat_prompt_ids(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True,
                          template: str | None = None, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The messages through the chat template, as token ids; rendered and tokenized in a worker thread."""
    tokenizer = state.tokenizer_or_400("chat")
    kwargs = template_kwargs or {}
    check_template_request(tokenizer, template, kwargs, state.settings.trust_request_chat_template)
    state.limits.check_text("".join(_texts(messages)), "messages")
    dicts = [m.template_dict() for m in messages]

    def render_and_encode() -> list[int]:
        text = render_chat(tokenizer, dicts, add_generation_prompt, template, kwargs,
                           state.settings.chat_template_timeout_s)
        state.limits.check_text(text, "messages")
        # The template writes special tokens (BOS included) itself.
        return tokenizer.encode(text, add_special_tokens=False)

    try:
        return await anyio.to_thread.run_sync(render_and_encode)
    except RenderTimeout as exc:
        raise ServerError(400, str(exc), "chat_template") from exc
    except (ValueError, TypeError, KeyError, TemplateError) as exc:  # no template, or one the messages do not fit
        raise ServerError(400, f"cannot apply the chat template: {exc}", "messages") from exc


def _texts(messages: list[ChatMessage]) -> list[str]:
    return [m.content if isinstance(m.content, str) else "".join(p["text"] for p in m.content or [])
            for m in messages]


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    state.limits.check_n(body.n)
    state.limits.check_logprobs(body.top_logprobs, "top_logprobs")
    ids = await chat_prompt_ids(state, body.messages, body.add_generation_prompt, body.chat_template,
                                body.chat_template_kwargs)
    return await respond(state, request, body, [{"prompt_token_ids": ids}], ChatShape(state, body))
