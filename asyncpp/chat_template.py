"""Chat templates: messages to prompt text.

The tokenizer's own template is the operator's and renders in this process, in a worker
thread (`asyncpp/prompts.py` runs it there). A template that comes with the request
(`chat_template`, or `chat_template_kwargs["chat_template"]`) is someone else's code:
whether to accept it at all is the caller's decision (the server's
--trust-request-chat-template); once accepted it renders through `render_request_template`,
in a renderer process bounded in time and memory (`template_sandbox.py`).
`chat_template_kwargs` may only set template variables: its keys must not be parameters of
transformers' `apply_chat_template` (`tokenize`, `return_dict`, ... change what it returns)
or of the renderer (`messages`, ...)."""
from __future__ import annotations

import inspect
import json
from functools import cache
from typing import TYPE_CHECKING, Any

from asyncpp.core.errors import InvalidRequest
from asyncpp.template_sandbox import TemplateSandbox

if TYPE_CHECKING:  # transformers loads only with the engine's tokenizer
    from transformers import PreTrainedTokenizerBase

RENDERER_NAMES = frozenset({"messages", "conversation", "conversations", "chat_template"})


def request_template(template: str | None, kwargs: dict[str, Any]) -> str | None:
    """The template a request brings, if any: `chat_template`, or `chat_template_kwargs["chat_template"]`."""
    return template if template is not None else kwargs.get("chat_template")


def check_template_kwargs(tokenizer: PreTrainedTokenizerBase, kwargs: dict[str, Any]) -> None:
    """Refuses keywords that are not template variables (`chat_template` itself is a template)."""
    reserved = sorted(set(kwargs) & reserved_names(type(tokenizer)) - {"chat_template"})
    if reserved:  # our own names (the intersection), so safe to show
        raise InvalidRequest(f"chat_template_kwargs may set template variables only, not {', '.join(reserved)} "
                             "(parameters of the renderer)", param="chat_template_kwargs")


@cache
def reserved_names(tokenizer_type: type) -> frozenset[str]:
    params = inspect.signature(tokenizer_type.apply_chat_template).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    return frozenset(named | RENDERER_NAMES)


def template_variables(kwargs: dict[str, Any], tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The request's template variables; `tools` become the template's `tools` (as transformers passes them)."""
    variables = {k: v for k, v in kwargs.items() if k != "chat_template"}
    if tools:
        variables["tools"] = tools
    return variables


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], add_generation_prompt: bool,
                kwargs: dict[str, Any], tools: list[dict[str, Any]] | None = None) -> str:
    """The text with the tokenizer's own template (blocking: call it in a worker thread)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_variables(kwargs, tools))


async def render_request_template(sandbox: TemplateSandbox, tokenizer: PreTrainedTokenizerBase, template: str,
                                  messages: list[dict[str, Any]], add_generation_prompt: bool,
                                  kwargs: dict[str, Any], timeout_s: float,
                                  tools: list[dict[str, Any]] | None = None) -> str:
    """A template that came with the request, rendered in the sandbox within `timeout_s`
    (InvalidRequest naming `chat_template` past it, or past the renderer's memory cap). Its
    variables are the tokenizer's special tokens and the request's, as apply_chat_template's."""
    variables = {**tokenizer.special_tokens_map, **template_variables(kwargs, tools)}
    return await sandbox.render(template, messages, add_generation_prompt, variables, timeout_s)


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-style message as chat templates read it (as vLLM passes it): no content as ""
    (an assistant turn that only called tools), and tool-call arguments as objects (clients send
    them as JSON text; templates write them out with tojson)."""
    message = dict(message)
    if message.get("content") is None:
        message["content"] = ""
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        message["tool_calls"] = [_arguments_as_object(call) for call in calls]
    return message


def _arguments_as_object(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": parsed}}
