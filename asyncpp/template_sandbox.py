"""Where chat templates that come with a request render: a small pool of renderer processes
(`template_renderer.py`), each with a cap on its address space, killed at the deadline.

A thread cannot be stopped at a deadline nor bounded in memory, and a template is code: a
loop of 10^10 steps or a string of a few GB. Here the engine process only waits on a pipe (on
the event loop, holding nothing); a renderer that runs past the deadline is killed, one that
hits its memory cap answers with an error, and the engine's own memory never sees either.
Renderers start on first use and are replaced when killed or dead; beyond the pool's size a
request waits for one within its own deadline."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from asyncpp.core.errors import EngineDeadError, InvalidRequest, QueueFullError

RENDERER = Path(__file__).with_name("template_renderer.py")
HEADER = struct.Struct(">I")
POOL_SIZE = 2
MIN_MEMORY_BYTES = 512 * 2**20
BYTES_PER_CHAR = 24  # the rendered text (4 bytes a character at most), its JSON copy and the template's pieces
SPAWN_TIMEOUT_S = 60.0  # a liveness bound on starting Python with jinja2 on a loaded machine
# What a renderer's error says about the request's field at fault.
PARAM_OF = {"memory": "chat_template", "recursion": "chat_template", "template": "chat_template",
            "input": "messages", "too_long": "messages"}


@dataclass(slots=True, eq=False)
class _Renderer:
    process: Process
    replies: BufferedByteReceiveStream

    async def call(self, request: bytes, most_bytes: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send(HEADER.pack(len(request)) + request)
        return json.loads(await _frame(self.replies, most_bytes))

    async def kill(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.kill()
            await self.process.aclose()  # waits for it: nothing is left behind


class TemplateSandbox:
    def __init__(self, max_chars: int, size: int = POOL_SIZE, memory_bytes: int | None = None):
        """`max_chars`: the longest text a render may return (longer is refused in the renderer)."""
        self.max_chars = max_chars
        self.size = size
        self.memory_bytes = memory_bytes or max(MIN_MEMORY_BYTES, BYTES_PER_CHAR * max_chars)
        self._idle: list[_Renderer] = []
        self._busy: set[_Renderer] = set()
        self._slots = anyio.Semaphore(size)
        self._closed = False
        self._warm = False

    def pids(self) -> list[int]:
        """The renderer processes alive now."""
        return [r.process.pid for r in [*self._idle, *self._busy]]

    async def render(self, template: str, messages: list[Any], add_generation_prompt: bool,
                     variables: dict[str, Any], timeout_s: float) -> str:
        """The rendered text, or InvalidRequest naming the field at fault (`chat_template` past
        `timeout_s`, which counts from the call: waiting for a free renderer, then rendering;
        QueueFullError when none was free within it)."""
        request = _request(template, messages, add_generation_prompt, variables, self.max_chars)
        deadline = time.monotonic() + timeout_s
        acquired = False
        with anyio.move_on_after(timeout_s):
            await self._slots.acquire()
            acquired = True
        if not acquired:
            raise QueueFullError(f"every chat template renderer ({self.size}) was busy for {timeout_s:g} s")
        try:
            return await self._render_on_one(request, deadline, timeout_s)
        finally:
            self._slots.release()

    async def _render_on_one(self, request: bytes, deadline: float, timeout_s: float) -> str:
        if self._closed:
            raise EngineDeadError("the engine was shut down", permanent=True)
        if self._idle:
            renderer = self._idle.pop()
        else:
            started = time.monotonic()
            renderer = await self._spawn()
            deadline += time.monotonic() - started  # starting Python is not the template's time
        self._busy.add(renderer)
        reply = None
        try:
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                reply = await renderer.call(request, 6 * self.max_chars + 4096)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError, ValueError):
            pass  # it died (or said something that is no reply): replaced below, the template's fault
        finally:
            self._busy.discard(renderer)
            if reply is None:  # killed at the deadline, dead, or its caller was cancelled mid-render
                await renderer.kill()
                if self._warm and not self._closed:  # a started pool stays full: its replacement now
                    await self._replace()
            elif self._closed:
                await renderer.kill()
            else:
                self._idle.append(renderer)
        if reply is None:
            if self._closed:
                raise EngineDeadError("the engine was shut down", permanent=True)
            if time.monotonic() >= deadline:
                raise InvalidRequest(f"the chat template took longer than {timeout_s:g} s to render",
                                     param="chat_template")
            raise InvalidRequest("the chat template's renderer died while rendering it (its memory cap is "
                                 f"{self.memory_bytes // 2**20} MiB)", param="chat_template")
        return _text(reply, self.max_chars)

    async def start(self) -> None:
        """Start the pool's renderers now rather than at the first render, and replace a
        killed one at once (else at the next render)."""
        self._warm = True
        while len(self._idle) + len(self._busy) < self.size and not self._closed:
            self._idle.append(await self._spawn())

    async def _replace(self) -> None:
        try:
            self._idle.append(await self._spawn())
        except Exception:  # OSError, TimeoutError: the next render starts one
            pass

    async def _spawn(self) -> _Renderer:
        process = await anyio.open_process(
            [sys.executable, "-I", str(RENDERER), str(self.memory_bytes), str(os.getpid())],
            stderr=subprocess.DEVNULL)
        assert process.stdout is not None
        renderer = _Renderer(process, BufferedByteReceiveStream(process.stdout))
        try:
            with anyio.fail_after(SPAWN_TIMEOUT_S):
                await _frame(renderer.replies, 0)  # ready
        except BaseException:
            await renderer.kill()
            raise
        return renderer

    async def aclose(self) -> None:
        """Kills every renderer (those rendering included); later renders are refused."""
        self._closed = True
        renderers, self._idle = [*self._idle, *self._busy], []
        for renderer in renderers:
            await renderer.kill()


def _request(template: str, messages: list[Any], add_generation_prompt: bool, variables: dict[str, Any],
             max_chars: int) -> bytes:
    """The render's inputs as JSON (what is not JSON becomes a placeholder, as transformers
    shows a template anything but plain data)."""
    payload = {"template": template, "messages": messages, "add_generation_prompt": add_generation_prompt,
               "variables": variables, "max_chars": max_chars}
    try:
        return json.dumps(payload, default=lambda o: f"<{type(o).__name__}>").encode()
    except (TypeError, ValueError) as e:  # keys that are not strings, circular data
        raise InvalidRequest(f"messages and chat_template_kwargs must be JSON data: {e}", param="messages") from e


def _text(reply: dict[str, Any], max_chars: int) -> str:
    if "text" in reply and isinstance(reply["text"], str):
        return reply["text"]
    kind, message = reply.get("error"), str(reply.get("message"))
    if kind == "too_long":
        message = (f"the rendered chat is {message} characters long, more than max_model_len can hold (at most "
                   f"{max_chars} characters are taken)")
    elif kind == "input":
        message = f"cannot apply the chat template: {message}"
    raise InvalidRequest(message, param=PARAM_OF.get(str(kind), "chat_template"))


async def _frame(stream: BufferedByteReceiveStream, most_bytes: int) -> bytes:
    (size,) = HEADER.unpack(await stream.receive_exactly(HEADER.size))
    if size > most_bytes:
        raise ValueError(f"a renderer's reply of {size} bytes, more than {most_bytes}")
    return await stream.receive_exactly(size) if size else b""
