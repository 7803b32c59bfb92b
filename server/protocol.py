"""The OpenAI wire format: request bodies (validated with pydantic) and their mapping to
SamplingParams. Field names and defaults follow OpenAI, plus vLLM's sampling extras."""
from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from asyncpp.core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class RequestModel(BaseModel):
    # Unknown fields are ignored as OpenAI and vLLM do, but named in the log: a typo'd
    # sampling field should not pass unnoticed.
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> "RequestModel":
        if self.model_extra:
            logger.warning("ignoring unknown fields in %s: %s", type(self).__name__,
                           ", ".join(sorted(self.model_extra)))
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
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # each choice also carries its (new) token ids

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
    prompt: str | list[str] | list[int] | list[list[int]]
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
        if prompt in ("", []) or any(p in ("", []) for p in prompt if not isinstance(p, int)):
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
    chat_template_kwargs: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None

    _unsupported = field_validator("logit_bias", "tools")(unsupported)

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
    tokens: list[int]



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
