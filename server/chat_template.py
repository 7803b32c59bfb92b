"""Chat templates, rendered off the event loop. The tokenizer's template is the operator's; a
template the request brings (`chat_template`, or `chat_template_kwargs.chat_template`) is code
from the client: refused unless the operator passed --trust-request-chat-template, and even
then rendered under a deadline. `chat_template_kwargs` may only set template variables: its
keys must not be parameters of transformers' `apply_chat_template` (`tokenize`, `return_dict`,
... change what it returns) or of the renderer (`messages`, ...)."""
from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from asyncpp.server.errors import ServerError
from asyncpp.server.log_hygiene import printable

if TYPE_CHECKING:  # transformers loads only with the engine's tokenizer
    from transformers import PreTrainedTokenizerBase

RENDERER_NAMES = frozenset({"messages", "conversation", "conversations", "chat_template"})
T = TypeVar("T")


class RenderTimeout(Exception):
    pass


def check_template_request(tokenizer: PreTrainedTokenizerBase, template: str | None,
                           kwargs: dict[str, Any], trusted: bool) -> None:
    """400 for a request-supplied template unless trusted, and for kwargs that are not template variables."""
    if (template is not None or "chat_template" in kwargs) and not trusted:
        param = "chat_template" if template is not None else "chat_template_kwargs"
        raise ServerError(400, f"{param}: this server does not render chat templates sent with the request; "
                               "its operator can allow them with --trust-request-chat-template", param)
    reserved = sorted(set(kwargs) & reserved_names(type(tokenizer)) - {"chat_template"})
    if reserved:
        names = printable(", ".join(reserved), 200)
        raise ServerError(400, f"chat_template_kwargs may set template variables only, not {names} "
                               "(parameters of the renderer)", "chat_template_kwargs")


@cache
def reserved_names(tokenizer_type: type) -> frozenset[str]:
    params = inspect.signature(tokenizer_type.apply_chat_template).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    return frozenset(named | RENDERER_NAMES)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], add_generation_prompt: bool,
                template: str | None, kwargs: dict[str, Any], timeout_s: float) -> str:
    """The rendered text; a request-supplied template gets `timeout_s`. Run it in a worker thread."""
    kwargs = dict(kwargs)
    template = kwargs.pop("chat_template", None) if template is None else template

    def render() -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)

    return render() if template is None else call_with_deadline(render, timeout_s)


def call_with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """`fn()`, raising RenderTimeout inside it once `timeout_s` has passed. A template compiles
    to Python, so a line tracer sees its every loop step; the thread is freed, not abandoned.
    (A single C-level operation, such as one huge string repeat, is not interrupted.)"""
    deadline = time.monotonic() + timeout_s

    def trace(frame: Any, event: str, arg: Any) -> Callable | None:
        if time.monotonic() > deadline:
            raise RenderTimeout(f"the chat template took longer than {timeout_s:g} s to render")
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        return fn()
    finally:
        sys.settrace(previous)
