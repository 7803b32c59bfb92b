"""RequestStream, without an engine: an anyio object stream of cumulative outputs where the
newest wins, that ends after the final one, carries the engine's error, and aborts the
request when closed early (once)."""
from __future__ import annotations

import anyio
import pytest

from asyncpp.core.outputs import CompletionOutput, RequestOutput
from asyncpp.engine.request_stream import RequestStream

pytestmark = pytest.mark.anyio


def output(tokens: int, finished: bool = False) -> RequestOutput:
    reason = "length" if finished else None
    return RequestOutput("r", None, [1], [CompletionOutput(0, "", list(range(tokens)), finish_reason=reason)], finished)


def stream() -> tuple[RequestStream, list[str]]:
    closed: list[str] = []
    return RequestStream("r", closed.append), closed


async def test_newest_output_wins_and_the_stream_ends_after_the_final_one():
    s, closed = stream()
    s.put(output(1))
    s.put(output(2))
    assert len((await s.receive()).outputs[0].token_ids) == 2
    s.put(output(3, finished=True))
    assert [len(o.outputs[0].token_ids) async for o in s] == [3]
    with pytest.raises(anyio.EndOfStream):
        await s.receive()
    assert closed == ["r"]  # the engine forgets a finished request once


async def test_the_engines_error_reaches_the_reader():
    s, closed = stream()
    s.fail(RuntimeError("stage died"))
    with pytest.raises(RuntimeError, match="stage died"):
        async for _ in s:
            pass
    assert closed == ["r"]


async def test_closing_early_aborts_once():
    s, closed = stream()
    async with s:
        s.put(output(1))
        await s.receive()
    await s.aclose()
    assert closed == ["r"]
    with pytest.raises(anyio.EndOfStream):
        await s.receive()


async def test_a_cancelled_reader_aborts():
    s, closed = stream()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await s.receive()
    assert closed == ["r"]
