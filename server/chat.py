"""POST /v1/chat/completions: plain or streamed `chat.completion` objects (streamed: the
assistant role first, then content deltas). The engine renders the chat template; tools
(server/tools.py) and reasoning (server/reasoning.py) shape the message."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from asyncpp.chat_template import request_template
from asyncpp.core.errors import InvalidRequest
from asyncpp.core.outputs import CompletionOutput, RequestOutput
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.core.structured_outputs import KINDS
from asyncpp.prompts import ChatPrompt
from asyncpp.server.chat_message import MessageReader
from asyncpp.server.errors import ServerError
from asyncpp.server.logprobs import chat_logprobs, prompt_logprobs
from asyncpp.server.protocol import ChatCompletionRequest, ChatMessage
from asyncpp.server.reasoning import ReasoningSplitter
from asyncpp.server.serving import ResponseShape, ServerState, respond
from asyncpp.server.tools import ToolPlan, plan_tools


class ChatShape(ResponseShape):
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"
    field_names = {"logprobs": "top_logprobs"}  # SamplingParams.logprobs comes from top_logprobs here
    body: ChatCompletionRequest

    def __init__(self, state: ServerState, body: ChatCompletionRequest, plan: ToolPlan | None):
        super().__init__(state, body)
        self.plan = plan
        self._readers: dict[int, MessageReader] = {}
        if plan is not None and plan.structured_outputs is not None:  # the tools' grammar is at fault
            self.field_names = {**self.field_names, **{f"structured_outputs.{k}": "tools" for k in KINDS}}

    def sampling_params(self) -> SamplingParams:
        params = super().sampling_params()
        if self.plan is None or self.plan.structured_outputs is None:
            return params
        if params.structured_outputs is not None:
            raise InvalidRequest(f"tool_choice {self.plan.choice} constrains the output to tool calls; it cannot be "
                                 "combined with response_format or structured_outputs", param="tool_choice")
        return replace(params, structured_outputs=self.plan.structured_outputs)

    def content(self, index: int, out: RequestOutput, c: CompletionOutput, text: str, chunk: bool) -> dict:
        reader = self._reader(index, out)
        return {"delta": reader.delta(text, c.finished)} if chunk else {"message": reader.message(text)}

    def finish_reason(self, index: int, c: CompletionOutput) -> str | None:
        reader = self._readers.get(index)
        if self.plan is None or reader is None:
            return c.finish_reason
        return self.plan.finish_reason(c.finish_reason, reader.num_calls)

    def _reader(self, index: int, out: RequestOutput) -> MessageReader:
        reader = self._readers.get(index)
        if reader is None:
            engine = self.state.engine
            markers = engine.reasoning_markers
            splitter = (ReasoningSplitter(markers, engine.starts_reasoning(out.prompt_token_ids))
                        if markers is not None else None)
            parser = self.plan.parser() if self.plan is not None else None
            reader = self._readers[index] = MessageReader(splitter, parser, self.body.include_reasoning)
        return reader

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
                cache_salt: str | None = None, tools: list[dict[str, Any]] | None = None) -> ChatPrompt:
    """The engine's chat input; a template the request brings only with --trust-request-chat-template."""
    kwargs = template_kwargs or {}
    if request_template(template, kwargs) is not None and not state.settings.trust_request_chat_template:
        param = "chat_template" if template is not None else "chat_template_kwargs"
        raise ServerError(400, f"{param}: this server does not render chat templates sent with the request; "
                               "its operator can allow them with --trust-request-chat-template", param)
    return ChatPrompt([m.template_dict() for m in messages], add_generation_prompt, template, kwargs, cache_salt,
                      state.settings.chat_template_timeout_s, tools)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    settings = state.settings
    tools = body.tool_dicts()
    plan = plan_tools(tools, body.tool_choice_value(), body.parallel_tool_calls, settings.enable_auto_tool_choice,
                      settings.tool_call_parser, state.engine.max_json_whitespace)
    prompt = chat_prompt(state, body.messages, body.add_generation_prompt, body.chat_template,
                         body.chat_template_kwargs, body.cache_salt, tools)
    return await respond(state, request, body, [prompt], ChatShape(state, body, plan))
