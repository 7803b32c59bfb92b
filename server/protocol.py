"""The OpenAI wire format: request bodies (validated with pydantic) and their mapping to
SamplingParams. Field names and defaults follow OpenAI, plus vLLM's sampling extras. What
this server cannot honour (images, tools, structured output) is refused with 400, as vLLM does."""
from __future__ import annotations

import logging
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from asyncpp.core.sampling_params import SamplingParams
from asyncpp.server.log_hygiene import printable

logger = logging.getLogger(__name__)

Prompt = str | list[int]
TokenIds = list[StrictInt]  # JSON true/false or 1.0 are not token ids

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256  # the engine rescans each stop string's length of text on every step
MAX_STOP_TOKEN_IDS = 1024
MAX_CHAT_TEMPLATE_CHARS = 100_000
MAX_LOGGED_FIELDS = 10


class RequestModel(BaseModel):
    # Unknown fields are ignored as OpenAI and vLLM do, but named in the log: a typo'd
    # sampling field should not pass unnoticed. NaN and infinities are no sampling values.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> "RequestModel":
        if self.model_extra:
            names = sorted(self.model_extra)
            more = f" and {len(names) - MAX_LOGGED_FIELDS} more" if len(names) > MAX_LOGGED_FIELDS else ""
            logger.warning("ignoring unknown fields in %s: %s%s", type(self).__name__,
                           printable(", ".join(names[:MAX_LOGGED_FIELDS]), 200), more)
        return self


def unsupported(value: Any, info: ValidationInfo) -> Any:
    if value:
        raise ValueError(f"{info.field_name} is not supported")
    return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(RequestModel):
    """Sampling fields shared by completions and chat (OpenAI's, then vLLM's extras)."""
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: TokenIds | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # each choice also carries its (new) token ids

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are taken, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters long")
        return stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _common_sampling(self) -> dict[str, Any]:
        values = dict(n=self.n, presence_penalty=self.presence_penalty,
                      frequency_penalty=self.frequency_penalty, min_tokens=self.min_tokens,
                      ignore_eos=self.ignore_eos, seed=self.seed, stop=self.stop or [],
                      stop_token_ids=self.stop_token_ids or [],
                      skip_special_tokens=self.skip_special_tokens,
                      include_stop_str_in_output=self.include_stop_str_in_output)
        optional = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        min_p=self.min_p, repetition_penalty=self.repetition_penalty)
        values.update({k: v for k, v in optional.items() if v is not None})
        return values


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None

    _unsupported = field_validator("echo", "suffix", "logit_bias")(unsupported)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:
        if prompt in ("", []) or (not isinstance(prompt, str) and any(p in ("", []) for p in prompt)):
            raise ValueError("prompt must not be empty")
        return prompt

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported")
        return best_of

    def prompts(self) -> list[Prompt]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, logprobs=self.logprobs, **self._common_sampling())


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}; got {printable(role, 40)!r}")
        return role

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: str | list[dict[str, Any]] | None) -> Any:
        for part in content if isinstance(content, list) else []:
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                shown = printable(str(kind), 40)
                raise ValueError(f"content parts must be {{'type': 'text', 'text': ...}}; this server reads "
                                 f"text only (got a part of type {shown!r})")
        return content

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: text parts joined into one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.get("text", "") for part in self.content
                                         if part.get("type") == "text")
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    chat_template: str | None = Field(default=None, max_length=MAX_CHAT_TEMPLATE_CHARS)
    chat_template_kwargs: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    _unsupported = field_validator("logit_bias", "tools")(unsupported)

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_calls(cls, choice: str | dict[str, Any] | None) -> Any:
        if choice not in (None, "none", "auto"):
            raise ValueError("only none or auto is supported: this server calls no tools")
        return choice

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, fmt: dict[str, Any] | None) -> Any:
        if fmt is not None and fmt.get("type", "text") != "text":
            raise ValueError(f"only type text is supported, got {printable(str(fmt.get('type')), 40)!r}")
        return fmt

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **self._common_sampling())


class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: TokenIds


def describe_validation_error(exc: ValidationError) -> tuple[str, str | None]:
    """A message naming the offending fields, and the first one as OpenAI's `param`."""
    errors = exc.errors(include_url=False)
    parts = []
    for error in errors[:3]:
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    first_loc = errors[0]["loc"] if errors else ()
    return "; ".join(parts) + more, (str(first_loc[0]) if first_loc else None)
