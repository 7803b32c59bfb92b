"""One test's face of a shared engine: AsyncLLM's request methods, awaitable from the test's
own event loop (asyncio or trio) while the engine runs on its thread (engine_thread.py).

Outputs cross the loops through a thread-safe queue: a pump task on the engine's loop puts
each output there, and the test's loop waits for it in a worker thread."""
from __future__ import annotations

import queue
from collections.abc import AsyncIterator
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream

from asyncpp.async_llm import EngineStats
from asyncpp.core.outputs import RequestOutput
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine.request_stream import RequestStream
from asyncpp.prompts import PromptInput
from asyncpp.testing.engine_thread import EngineThread

_END = object()


class RemoteStream(ObjectReceiveStream[RequestOutput]):
    """The test's end of a RequestStream, an anyio object stream as it is: cumulative
    outputs; closing it (or cancelling its consumer) aborts the request, and its KV blocks
    are free when close() returns."""

    def __init__(self, host: EngineThread, stream: RequestStream):
        self.request_id = stream.request_id
        self._host, self._stream = host, stream
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done = False
        host.portal.start_task_soon(self._pump)

    async def _pump(self) -> None:  # on the engine's loop
        try:
            async for output in self._stream:
                self._items.put(output)
        except Exception as error:  # the engine's failure is the consumer's to see
            self._items.put(error)
        self._items.put(_END)

    async def receive(self) -> RequestOutput:
        if self._done:
            raise anyio.EndOfStream
        try:
            item = await anyio.to_thread.run_sync(self._items.get, abandon_on_cancel=True)
        except BaseException:
            self.close()
            raise
        if isinstance(item, RequestOutput):
            return item
        self._done = True
        if item is _END:
            raise anyio.EndOfStream
        raise item

    @property
    def finished(self) -> bool:
        return self._done

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._host.call(self._stream.close)
            self._items.put(_END)  # wakes a waiter that a cancelled receive() left behind

    async def aclose(self) -> None:
        self.close()


class EngineView:
    """What the `asyncpp_engine` fixture gives a test: the request side of AsyncLLM
    (add_request, generate, abort, stats, is_healthy, tokenizer, config, model_name)."""

    def __init__(self, host: EngineThread):
        self._host = host
        self._streams: list[RemoteStream] = []
        engine = host.engine
        self.args, self.config, self.tokenizer, self.model_name = (
            engine.args, engine.config, engine.tokenizer, engine.model_name)

    async def add_request(self, prompt: PromptInput, params: SamplingParams | None = None,
                          request_id: str | None = None) -> RemoteStream:
        stream = await anyio.to_thread.run_sync(self._host.call, self._host.engine.add_request, prompt, params,
                                                request_id)
        remote = RemoteStream(self._host, stream)
        self._streams.append(remote)
        return remote

    async def generate(self, prompt: PromptInput, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        async with await self.add_request(prompt, sampling_params, request_id) as stream:
            async for output in stream:
                yield output

    async def abort(self, request_id: str) -> bool:
        return self._host.call(self._host.engine.abort, request_id)

    def stats(self) -> EngineStats:
        return self._host.stats()

    def is_healthy(self) -> bool:
        return self._host.call(self._host.engine.is_healthy)

    def param_bytes_per_rank(self) -> list[int]:
        return self._host.call(self._host.engine.param_bytes_per_rank)

    def release(self) -> None:
        """The test is over: abort what it left running, and see the engine idle again."""
        for stream in self._streams:
            stream.close()
        self._streams.clear()
        self._host.wait_idle()
