"""The engine's one way in for a prompt: text, token ids, vLLM-style dicts, or chat messages,
resolved to checked token ids. What can be refused without a tokenizer (the shape, text
far too long for max_model_len, too many ids) is refused at once; tokenizing and rendering
the tokenizer's chat template run in a worker thread, a request's own template in a
renderer process (`template_sandbox.py`), so no prompt holds up the event loop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import anyio
from jinja2 import TemplateError

from asyncpp.chat_template import check_template_kwargs, render_chat, render_request_template, request_template
from asyncpp.core.errors import InvalidRequest
from asyncpp.template_sandbox import TemplateSandbox

# Text longer than this many characters per token of max_model_len is refused before it is
# tokenized (no tokenizer in use packs more into one token but for pathological text).
PROMPT_CHARS_PER_TOKEN = 32
CHAT_TEMPLATE_TIMEOUT_S = 5.0
CHECK_IDS_INLINE = 4096  # longer id lists are checked in a worker thread (~60 ns an id)


@dataclass(slots=True)
class ChatPrompt:
    """Chat messages, rendered with the tokenizer's chat template (or `chat_template`, code
    the caller vouches for, rendered within `chat_template_timeout_s`)."""
    messages: list[dict[str, Any]]  # {"role": ..., "content": text}, as chat templates read them
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # template variables
    cache_salt: str | None = None  # as a dict prompt's
    chat_template_timeout_s: float = CHAT_TEMPLATE_TIMEOUT_S
    tools: list[dict[str, Any]] | None = None  # OpenAI-style function tools, for the template's `tools`


PromptInput = Union[str, list[int], dict[str, Any], ChatPrompt]


@dataclass(frozen=True, slots=True)
class ResolvedPrompt:
    text: str | None  # the prompt's text (a chat's as rendered); None for token ids alone
    token_ids: list[int]
    cache_salt: str | None = None


class PromptResolver:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer  # None: token ids only (skip_tokenizer_init)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.sandbox = TemplateSandbox(PROMPT_CHARS_PER_TOKEN * max_model_len)  # starts renderers on first use

    async def aclose(self) -> None:
        await self.sandbox.aclose()

    async def resolve(self, prompt: PromptInput) -> ResolvedPrompt:
        """Token ids that exist and leave room for one output token, or InvalidRequest."""
        salt = cache_salt(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return ResolvedPrompt(prompt.get("prompt"), await self._checked_ids(prompt["prompt_token_ids"]), salt)
            if "prompt" not in prompt:
                raise InvalidRequest("a dict prompt needs 'prompt' or 'prompt_token_ids'", param="prompt")
            prompt = prompt["prompt"]
        if isinstance(prompt, (list, tuple)):
            return ResolvedPrompt(None, await self._checked_ids(prompt), salt)
        if isinstance(prompt, str) and not prompt:
            raise InvalidRequest("prompt is empty", param="prompt")
        if not isinstance(prompt, (str, ChatPrompt)):
            raise InvalidRequest(f"prompt must be a string, a list of token ids, a dict or a ChatPrompt, got "
                                 f"{type(prompt).__name__}", param="prompt")
        self._check_before_tokenizing(prompt)
        text, ids = await self._encode(prompt, True, check=True)
        return ResolvedPrompt(text, ids, salt)

    async def tokenize(self, prompt: str | ChatPrompt, add_special_tokens: bool = True) -> list[int]:
        """The token ids of a text or a chat, unchecked against the model (what /tokenize
        shows). A chat's template writes its own special tokens."""
        self._check_before_tokenizing(prompt)
        return (await self._encode(prompt, add_special_tokens, check=False))[1]

    def _check_before_tokenizing(self, prompt: str | ChatPrompt) -> None:
        if isinstance(prompt, str):
            self._tokenizer("text prompts", "prompt")
            self._check_chars(len(prompt), "prompt")
            return
        tokenizer = self._tokenizer("chat messages", "messages")
        if not prompt.messages or not all(isinstance(m, dict) for m in prompt.messages):
            raise InvalidRequest("messages must be a non-empty list of {'role': ..., 'content': ...}",
                                 param="messages")
        check_template_kwargs(tokenizer, prompt.chat_template_kwargs)
        self._check_chars(sum(map(_content_chars, prompt.messages)), "messages")

    async def _checked_ids(self, ids: Any) -> list[int]:
        """The caller's ids: the length at once (a list far too long is refused unread), each
        id in a worker thread when there are many."""
        ids = self._sized(ids)
        return self._valid(ids) if len(ids) <= CHECK_IDS_INLINE else await anyio.to_thread.run_sync(self._valid, ids)

    async def _encode(self, prompt: str | ChatPrompt, add_special_tokens: bool, check: bool
                      ) -> tuple[str, list[int]]:
        """The text and its ids (checked against the model with `check`), off the event loop."""
        if isinstance(prompt, ChatPrompt):
            template = request_template(prompt.chat_template, prompt.chat_template_kwargs)
            if template is not None:
                text = await render_request_template(self.sandbox, self.tokenizer, template, prompt.messages,
                                                     prompt.add_generation_prompt, prompt.chat_template_kwargs,
                                                     prompt.chat_template_timeout_s, prompt.tools)
                return await anyio.to_thread.run_sync(self._encode_text, text, False, check)
        return await anyio.to_thread.run_sync(self._encode_text, prompt, add_special_tokens, check)

    # -- in a worker thread --------------------------------------------------------------
    def _encode_text(self, prompt: str | ChatPrompt, add_special_tokens: bool, check: bool) -> tuple[str, list[int]]:
        if isinstance(prompt, ChatPrompt):
            prompt, add_special_tokens = self._render(prompt), False  # the template wrote them
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return prompt, self._valid(self._sized(ids)) if check else ids

    def _render(self, chat: ChatPrompt) -> str:
        """With the tokenizer's own template."""
        try:
            text = render_chat(self.tokenizer, chat.messages, chat.add_generation_prompt, chat.chat_template_kwargs,
                               chat.tools)
        except (ValueError, TypeError, KeyError, TemplateError) as exc:  # no template, or messages it cannot take
            raise InvalidRequest(f"cannot apply the chat template: {exc}", param="messages") from exc
        self._check_chars(len(text), "messages")
        return text

    # -- checks ---------------------------------------------------------------------------
    def _tokenizer(self, what: str, param: str) -> Any:
        if self.tokenizer is None:
            raise InvalidRequest(f"{what} need a tokenizer (the engine runs with skip_tokenizer_init=True): "
                                 "pass {'prompt_token_ids': [...]}", param=param)
        return self.tokenizer

    def _check_chars(self, chars: int, param: str) -> None:
        """Refuses text that cannot fit max_model_len tokens, before a tokenizer spends time on it."""
        most = PROMPT_CHARS_PER_TOKEN * self.max_model_len
        if chars > most:
            raise InvalidRequest(f"{param} is {chars} characters long, far more than max_model_len "
                                 f"({self.max_model_len} tokens) can hold: at most {most} characters are taken",
                                 param=param)

    def _sized(self, ids: Any) -> list[int] | tuple[int, ...]:
        """Ids with room for one output token after them."""
        ids = ids if isinstance(ids, (list, tuple)) else list(ids)
        if not ids:
            raise InvalidRequest("prompt is empty (no tokens)", param="prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(f"prompt is {len(ids)} tokens long but max_model_len is {self.max_model_len}: "
                                 "the prompt plus at least one output token must fit", param="prompt")
        return ids

    def _valid(self, ids: list[int] | tuple[int, ...]) -> list[int]:
        """Ids that exist, as a list of our own (the caller may reuse theirs)."""
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise InvalidRequest(f"prompt_token_ids holds {t!r}, not a token id in [0, {self.vocab_size})",
                                     param="prompt")
        return list(ids)


def cache_salt(prompt: PromptInput) -> str | None:
    """A prompt's `cache_salt` (vLLM's field): only prompts with the same salt share cached
    KV, so one tenant cannot probe another's prompts through cache timing."""
    if isinstance(prompt, ChatPrompt):
        salt = prompt.cache_salt
    else:
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise InvalidRequest("cache_salt must be a non-empty string", param="cache_salt")
    return salt


def _content_chars(message: dict[str, Any]) -> int:
    """Characters of a message's text (a string, or text parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    parts = content if isinstance(content, list) else []
    return sum(len(p.get("text") or "") for p in parts if isinstance(p, dict))
