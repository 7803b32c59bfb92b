"""What completions and chat share: one app's engine state, starting engine requests with
errors mapped to HTTP statuses, and iterating their outputs until done or cancelled."""
from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from asyncpp.async_llm import AsyncLLM
from asyncpp.core.errors import InvalidRequest
from asyncpp.core.outputs import CompletionOutput, RequestOutput
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.core.structured_outputs import KINDS
from asyncpp.engine.request_stream import RequestStream
from asyncpp.prompts import PromptInput
from asyncpp.server.errors import ServerError, to_server_error
from asyncpp.server.log_hygiene import printable
from asyncpp.server.metrics import RequestTracker, ServerMetrics
from asyncpp.server.protocol import SamplingFields
from asyncpp.server.settings import ServerSettings
from asyncpp.server.sse import DONE, Emit, EventStreamResponse, cancel_on_disconnect, event

if TYPE_CHECKING:  # transformers loads only with the engine's tokenizer
    from transformers import PreTrainedTokenizerBase

OnOutput = Callable[[int, RequestOutput], Awaitable[None]]


@dataclass(slots=True)
class ServerState:
    engine: AsyncLLM
    metrics: ServerMetrics
    settings: ServerSettings = field(default_factory=ServerSettings)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ServerError(404, f"The model `{printable(name, 100)}` does not exist.", "model")

    def tokenizer_or_400(self, what: str) -> PreTrainedTokenizerBase:
        if self.engine.tokenizer is None:
            raise ServerError(400, f"{what} needs a tokenizer; this server runs with skip_tokenizer_init")
        return self.engine.tokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def open_streams(engine: AsyncLLM, prompts: list[PromptInput], params: SamplingParams,
                       shape: ResponseShape) -> list[RequestStream]:
    """Enqueues every prompt (all or none), so that refusals become HTTP errors before a
    streamed response has started."""
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            rid = shape.request_id if len(prompts) == 1 else f"{shape.request_id}-{i}"
            streams.append(await engine.add_request(prompt, params, request_id=rid))
    except Exception as exc:
        await close_streams(streams)
        raise shape.http_error(exc) from exc
    return streams


async def close_streams(streams: list[RequestStream]) -> None:
    with anyio.CancelScope(shield=True):  # abort even when the caller is being cancelled
        for stream in streams:
            await stream.aclose()


async def run_streams(streams: list[RequestStream], tracker_of: Callable[[], RequestTracker],
                      on_output: OnOutput) -> None:
    """Feeds each stream's outputs to `on_output` with the stream's index, concurrently;
    every request still running on exit (error, cancellation, disconnect) is aborted."""
    async def pump(index: int, stream: RequestStream) -> None:
        tracker = tracker_of()
        async for out in stream:
            tracker.observe(out)
            await on_output(index, out)

    errors: list[Exception] = []

    async def pump_or_stop_all(index: int, stream: RequestStream, tg: TaskGroup) -> None:
        try:
            await pump(index, stream)
        except Exception as exc:  # raised again outside the group, so not wrapped in an ExceptionGroup
            errors.append(exc)
            tg.cancel_scope.cancel()

    try:
        if len(streams) == 1:
            await pump(0, streams[0])
        else:
            async with anyio.create_task_group() as tg:
                for index, stream in enumerate(streams):
                    tg.start_soon(pump_or_stop_all, index, stream, tg)
            if errors:
                raise errors[0]
    finally:
        await close_streams(streams)


def usage(finals: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(out.prompt_token_ids) for out in finals)
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    cached = sum(out.num_cached_tokens or 0 for out in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass(slots=True)
class DeltaTracker:
    """Cuts each choice's cumulative text (and tokens) into the part not yet sent."""
    sent_chars: dict[int, int] = field(default_factory=dict)
    sent_tokens: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)

    def deltas(self, base: int, out: RequestOutput) -> list[tuple[int, CompletionOutput, str, int]]:
        """(choice index, output, new text, first new token) for every choice with news."""
        news = []
        for choice in out.outputs:
            index = base + choice.index
            if index in self.done:
                continue
            chars, tokens = self.sent_chars.get(index, 0), self.sent_tokens.get(index, 0)
            text = choice.text[chars:]
            # New tokens count as news even without new text (ids-only engines, a partial
            # UTF-8 character): clients see every step and can time it.
            if not text and len(choice.token_ids) == tokens and choice.finish_reason is None:
                continue
            self.sent_chars[index], self.sent_tokens[index] = len(choice.text), len(choice.token_ids)
            if choice.finish_reason is not None:
                self.done.add(index)
            news.append((index, choice, text, tokens))
        return news


class ResponseShape:
    """How one endpoint dresses choices (`chunk` selects the streamed form), and names the
    body's fields in errors."""
    object_name = ""
    chunk_object_name = ""
    id_prefix = ""
    field_names: dict[str, str] = {}  # the engine's name of a field -> this body's, where they differ

    def __init__(self, state: ServerState, body: SamplingFields):
        self.state, self.body = state, body
        self.request_id = new_id(self.id_prefix)
        self.created = int(time.time())
        if body.response_format is not None and body.structured_outputs is None:  # its constraint is at fault
            self.field_names = {**self.field_names, **{f"structured_outputs.{k}": "response_format" for k in KINDS}}

    def envelope(self, choices: list[dict], chunk: bool, **extra: Any) -> dict[str, Any]:
        return {"id": self.request_id, "object": self.chunk_object_name if chunk else self.object_name,
                "created": self.created, "model": self.state.model_name, "choices": choices, **extra}

    def sampling_params(self) -> SamplingParams:
        return self.body.sampling_params()

    def choice(self, index: int, out: RequestOutput, c: CompletionOutput, text: str, first_token: int,
               chunk: bool) -> dict:
        """One choice (of `out`) holding `text` and the tokens from `first_token` on."""
        entry = {"index": index, **self.content(index, out, c, text, chunk),
                 "logprobs": self.logprobs(c, text, first_token), "finish_reason": self.finish_reason(index, c),
                 "stop_reason": c.stop_reason}
        if self.body.return_token_ids:
            entry["token_ids"] = c.token_ids[first_token:]
        return entry

    def content(self, index: int, out: RequestOutput, c: CompletionOutput, text: str, chunk: bool) -> dict:
        raise NotImplementedError

    def finish_reason(self, index: int, c: CompletionOutput) -> str | None:
        return c.finish_reason

    def logprobs(self, c: CompletionOutput, text: str, first_token: int) -> dict | None:
        raise NotImplementedError

    def opening_choices(self, num_choices: int) -> list[dict]:
        """Chunks sent before any output (chat's role deltas)."""
        return []

    def whole(self, outs: list[RequestOutput]) -> dict[str, Any]:
        """A whole (not streamed) response."""
        choices = [self.choice(i * self.body.n + c.index, out, c, c.text, 0, chunk=False)
                   for i, out in enumerate(outs) for c in out.outputs]
        return self.envelope(choices, chunk=False, usage=usage(outs))

    def http_error(self, exc: Exception) -> ServerError:
        error = to_server_error(exc)
        error.param = self.field_names.get(error.param or "", error.param)
        return error


async def respond(state: ServerState, request: Request, body: SamplingFields,
                  prompts: list[PromptInput], shape: ResponseShape) -> Response:
    """Runs one completions/chat request (the engine checks it): a streamed or a whole response."""
    try:
        params = shape.sampling_params()
    except InvalidRequest as exc:
        raise shape.http_error(exc) from exc
    streams = await open_streams(state.engine, prompts, params, shape)
    if body.stream:
        return EventStreamResponse(lambda emit: _stream(state, streams, body, shape, emit))

    finals: dict[int, RequestOutput] = {}

    async def keep_last(index: int, out: RequestOutput) -> None:
        finals[index] = out

    async def collect() -> None:
        try:
            await run_streams(streams, state.metrics.tracker, keep_last)
        except Exception as exc:
            raise to_server_error(exc) from exc

    finished, _ = await cancel_on_disconnect(request.receive, collect)
    if not finished:
        return Response(status_code=499)  # the client is gone; nobody reads this
    return JSONResponse(shape.whole([finals[i] for i in sorted(finals)]))


async def _stream(state: ServerState, streams: list[RequestStream], body: SamplingFields, shape: ResponseShape,
                  emit: Emit) -> None:
    deltas = DeltaTracker()
    finals: dict[int, RequestOutput] = {}

    async def send_deltas(index: int, out: RequestOutput) -> None:
        if out.finished:
            finals[index] = out
        for choice_index, choice, text, first_token in deltas.deltas(index * body.n, out):
            await emit(event(shape.envelope([shape.choice(choice_index, out, choice, text, first_token, chunk=True)],
                                            chunk=True)))

    try:
        opening = shape.opening_choices(len(streams) * body.n)
        if opening:
            await emit(event(shape.envelope(opening, chunk=True)))
        await run_streams(streams, state.metrics.tracker, send_deltas)
    except Exception as exc:
        await emit(event(to_server_error(exc).body()))
    else:
        if body.include_usage:
            await emit(event(shape.envelope([], chunk=True, usage=usage([finals[i] for i in sorted(finals)]))))
    finally:
        await close_streams(streams)  # also when cancelled before run_streams took them over
    await emit(DONE)
