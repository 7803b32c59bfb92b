"""The OpenAI wire format: request bodies (validated with pydantic) and their mapping to
SamplingParams. Field names and defaults follow OpenAI, plus vLLM's sampling extras
(`structured_outputs`, ...). What this server cannot honour (images, audio) is refused with
400, as vLLM does."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from asyncpp.chat_template import template_message
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.core.structured_outputs import StructuredOutputsParams
from asyncpp.server.log_hygiene import printable

logger = logging.getLogger(__name__)

Prompt = str | list[int]
Role = Literal["system", "user", "assistant", "tool", "developer"]
ROLES: tuple[str, ...] = get_args(Role)
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256  # the engine rescans each stop string's length of text on every step
MAX_STOP_TOKEN_IDS = 1024
MAX_CHAT_TEMPLATE_CHARS = 100_000
MAX_LOGGED_FIELDS = 10
INT64 = 2**63 - 1  # the sampler keeps integer fields in int64 tensors

# The bounds SamplingParams enforces, stated here too so that the OpenAPI document shows them.
Int64 = Annotated[int, Field(ge=-INT64, le=INT64)]
Count = Annotated[int, Field(ge=0, le=INT64)]
Positive = Annotated[int, Field(ge=1, le=INT64)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Probability = Annotated[float, Field(ge=0, le=1)]
TokenId = Annotated[int, Field(ge=0, le=INT64)]
# Lists stop at their first bad item: a million bad ones would cost seconds of error objects.
TokenIds = Annotated[list[TokenId], Field(fail_fast=True)]
PromptIds = Annotated[list[TokenId], Field(min_length=1, fail_fast=True)]
PromptText = Annotated[str, Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


# What the validators below refuse, said in the OpenAPI document too: an unsupported field
# may only be empty, or false.
EMPTY = {"maxLength": 0, "maxItems": 0, "maxProperties": 0}  # each keyword lets other JSON types by
TEXT_PARTS = {"items": {"type": "object", "required": ["type", "text"],
                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}


class RequestModel(BaseModel):
    # Unknown fields are ignored as OpenAI and vLLM do, but named in the log: a typo'd
    # sampling field should not pass unnoticed. Types are strict (true is no token id, "1" no
    # count), and NaN and infinities are no sampling values.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

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


def default_only(default: Any) -> Any:
    """A vLLM field this server does not implement: accepted at its default value only (any
    other would change what comes back, and is refused naming the field)."""
    return Field(default=default, json_schema_extra={"const": default})


def only_default(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    default = cls.model_fields[info.field_name or ""].default
    if value != default or isinstance(value, bool) != isinstance(default, bool):  # 0 is no False
        raise ValueError(f"{info.field_name} is not supported by this server (only {default!r})")
    return value


# vLLM's request fields this server does not implement, with their defaults.
VLLM_UNIMPLEMENTED = ("use_beam_search", "length_penalty", "truncate_prompt_tokens", "allowed_token_ids",
                      "bad_words", "logits_processors", "guided_json", "guided_regex",
                      "guided_choice", "guided_grammar", "prompt_embeds", "return_tokens_as_token_ids",
                      "spaces_between_special_tokens")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format (and vLLM's structural_tag form, whose other fields are the tag)."""
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError("type json_schema needs json_schema.schema")
        return self

    def constraint(self) -> dict[str, Any]:
        """The StructuredOutputsParams fields this format sets (none for text)."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            assert self.json_schema is not None
            return {"json": self.json_schema.json_schema}
        if self.type == "structural_tag":
            return {"structural_tag": json.dumps(self.model_dump(exclude_none=True))}
        return {}


class SamplingFields(RequestModel):
    """Sampling fields shared by completions and chat (OpenAI's, then vLLM's extras)."""
    model: str | None = None
    n: Positive = 1
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: Stop | None = None
    seed: Int64 | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: Annotated[int, Field(ge=-1, le=INT64)] | None = None  # 0 or -1: off
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False
    min_tokens: Count = 0
    stop_token_ids: TokenIds | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # each choice also carries its (new) token ids
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)  # shares cached KV only within a salt
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's StructuredOutputsParams fields
    prompt_logprobs: Count | None = None  # per prompt token, not with stream (the response carries them whole)
    use_beam_search: Any = default_only(False)
    length_penalty: Any = default_only(1.0)
    truncate_prompt_tokens: Any = default_only(None)
    allowed_token_ids: Any = default_only(None)
    bad_words: Any = default_only(None)
    logits_processors: Any = default_only(None)
    guided_json: Any = default_only(None)
    guided_regex: Any = default_only(None)
    guided_choice: Any = default_only(None)
    guided_grammar: Any = default_only(None)
    prompt_embeds: Any = default_only(None)
    return_tokens_as_token_ids: Any = default_only(False)
    spaces_between_special_tokens: Any = default_only(True)

    _vllm_unimplemented = field_validator(*VLLM_UNIMPLEMENTED)(classmethod(only_default))

    @field_validator("prompt_logprobs")
    @classmethod
    def _not_streamed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("stream"):
            raise ValueError("prompt_logprobs is not supported with stream (a whole response carries them)")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _common_sampling(self) -> dict[str, Any]:
        values = dict(n=self.n, presence_penalty=self.presence_penalty, prompt_logprobs=self.prompt_logprobs,
                      frequency_penalty=self.frequency_penalty, min_tokens=self.min_tokens,
                      ignore_eos=self.ignore_eos, seed=self.seed, stop=self.stop or [],
                      stop_token_ids=self.stop_token_ids or [],
                      skip_special_tokens=self.skip_special_tokens,
                      include_stop_str_in_output=self.include_stop_str_in_output,
                      structured_outputs=self.constraint())
        optional = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        min_p=self.min_p, repetition_penalty=self.repetition_penalty)
        values.update({k: v for k, v in optional.items() if v is not None})
        return values

    def constraint(self) -> StructuredOutputsParams | None:
        """`structured_outputs`, with `response_format` setting its constraint (as vLLM merges them)."""
        given = StructuredOutputsParams.of(self.structured_outputs) if self.structured_outputs is not None else None
        fields = self.response_format.constraint() if self.response_format is not None else {}
        if not fields:
            return given
        if given is None:
            return StructuredOutputsParams(**fields)
        return replace(given, **fields)


def _prompt_form(value: Any) -> str:
    """Which form a prompt takes, from its type and its first item's: pydantic then validates
    that form only (trying each form of a union on a list of a million ids costs a second on
    the event loop). The tags are the forms' names, which error locations leave out."""
    if isinstance(value, list) and value:
        return {str: "list[str]", list: "list[list[int]]"}.get(type(value[0]), "list[int]")
    return "str" if isinstance(value, str) else "list[int]"


PromptForms = Annotated[
    Annotated[PromptText, Tag("str")] | Annotated[PromptIds, Tag("list[int]")]
    | Annotated[list[PromptText], Field(min_length=1, fail_fast=True), Tag("list[str]")]
    | Annotated[list[PromptIds], Field(min_length=1, fail_fast=True), Tag("list[list[int]]")],
    Discriminator(_prompt_form)]


class CompletionRequest(SamplingFields):
    prompt: PromptForms = Field(
        description="a non-empty string, a list of them, a non-empty list of token ids, or a list of those")
    max_tokens: Positive | None = 16
    logprobs: Count | None = None
    echo: bool = Field(default=False, json_schema_extra={"const": False})
    suffix: str | None = Field(default=None, json_schema_extra=EMPTY)
    best_of: Positive | None = None
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra=EMPTY)
    add_special_tokens: Any = default_only(True)

    _unsupported = field_validator("echo", "suffix", "logit_bias")(unsupported)
    _default_only = field_validator("add_special_tokens")(classmethod(only_default))

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
    model_config = ConfigDict(extra="allow", strict=True)
    role: Role
    content: str | list[dict[str, Any]] | None = Field(default=None, json_schema_extra=TEXT_PARTS)

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
        """The message as chat templates expect it: text parts joined into one string, then
        `template_message`."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.get("text", "") for part in self.content
                                         if part.get("type") == "text")
        return template_message(message)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: Positive | None = None
    max_completion_tokens: Positive | None = None
    logprobs: bool = False
    top_logprobs: Count | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = Field(default=None, max_length=MAX_CHAT_TEMPLATE_CHARS)
    chat_template_kwargs: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra=EMPTY)
    tools: Annotated[list[ChatTool], Field(min_length=1)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True  # with --reasoning-parser: answer the reasoning too

    echo: Any = default_only(False)
    continue_final_message: Any = default_only(False)
    documents: Any = default_only(None)
    add_special_tokens: Any = default_only(False)

    _unsupported = field_validator("logit_bias")(unsupported)
    _default_only = field_validator("echo", "continue_final_message", "documents", "add_special_tokens")(
        classmethod(only_default))

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools")
        if choice not in (None, "none") and not tools:
            raise ValueError("tool_choice other than none needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"names {printable(choice.function.name, 64)!r}, which is not among the tools")
        return choice

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates and xgrammar read them."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def tool_choice_value(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

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
    # One of prompt or messages, as the document says too.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, fail_fast=True)
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
    described = list(dict.fromkeys(_describe(error) for error in exc.errors(include_url=False)))
    more = f" (and {len(described) - 3} more)" if len(described) > 3 else ""
    errors = exc.errors(include_url=False)
    first_loc = errors[0]["loc"] if errors else ()
    return "; ".join(described[:3]) + more, (str(first_loc[0]) if first_loc else None)


def _describe(error: Any) -> str:
    # pydantic names the member of a union it tried (`constrained-str`, `list[int]`): noise here.
    where = ".".join(str(part) for part in error["loc"] if not _is_union_member(part))
    return f"{where}: {error['msg']}" if where else error["msg"]


def _is_union_member(part: str | int) -> bool:
    return isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int", "float", "bool"))
