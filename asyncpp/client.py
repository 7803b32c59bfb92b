"""The HTTP SDK for an asyncpp (or any OpenAI-compatible) server, on httpx: works under
asyncio and trio.

    async with Client("http://127.0.0.1:8000") as client:
        text = await client.generate("San Francisco is a", max_tokens=32, temperature=0)
        async for delta in client.stream("San Francisco is a", max_tokens=32):
            print(delta, end="")

Sampling keywords are the server's request fields (max_tokens, temperature, top_p, top_k,
stop, seed, ignore_eos, response_format, structured_outputs as a dict or a
StructuredOutputsParams, tools, tool_choice, ...). `chat_message` answers the whole assistant
message (tool_calls, reasoning_content). Leaving a stream early: wrap it in
`contextlib.aclosing` so the connection closes (and the server aborts the request) at once.

    answer = await client.generate("Name a color:", structured_outputs={"choice": ["red", "blue"]})
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx

Message = dict[str, Any]


class APIError(Exception):
    """An error answer from the server (or an error event inside a stream)."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None):
        super().__init__(f"{status} {type or 'error'}: {message}" + (f" (param: {param})" if param else ""))
        self.status, self.message, self.type, self.param = status, message, type, param

    @classmethod
    def from_body(cls, status: int, body: Any) -> "APIError":
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls(status, str(body))
        return cls(int(error.get("code") or status), str(error.get("message")), error.get("type"), error.get("param"))


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = 600.0, model: str | None = None):
        """`model`: the name sent with each request (default: the server's own model)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.model = model

    async def __aenter__(self) -> "Client":
        await self._http.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._http.__aexit__(*exc_info)

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- generation ---------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], **sampling: Any) -> str:
        body = await self._post("/v1/completions", self._body(prompt=prompt, **sampling))
        return body["choices"][0]["text"]

    async def stream(self, prompt: str | list[int], **sampling: Any) -> AsyncIterator[str]:
        """Text deltas as the server generates them."""
        body = self._body(prompt=prompt, stream=True, **sampling)
        async with aclosing(self._events("/v1/completions", body)) as chunks:
            async for chunk in chunks:
                for choice in chunk["choices"]:
                    if choice.get("text"):
                        yield choice["text"]

    async def chat(self, messages: list[Message], **sampling: Any) -> str:
        return (await self.chat_message(messages, **sampling))["content"]

    async def chat_message(self, messages: list[Message], **fields: Any) -> Message:
        """The assistant's whole message: content, and tool_calls or reasoning_content when there are."""
        body = await self._post("/v1/chat/completions", self._body(messages=messages, **fields))
        return body["choices"][0]["message"]

    async def chat_stream(self, messages: list[Message], **sampling: Any) -> AsyncIterator[str]:
        """The assistant's reply as text deltas."""
        body = self._body(messages=messages, stream=True, **sampling)
        async with aclosing(self._events("/v1/chat/completions", body)) as chunks:
            async for chunk in chunks:
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        yield choice["delta"]["content"]

    # -- server -------------------------------------------------------------------------
    async def models(self) -> list[str]:
        response = await self._http.get("/v1/models")
        return [card["id"] for card in _checked(response)["data"]]

    async def health(self) -> bool:
        """True when the server answers /health with 200 (False on 503 or no answer)."""
        try:
            response = await self._http.get("/health")
        except httpx.TransportError:
            return False
        return response.status_code == 200

    # -- plumbing -----------------------------------------------------------------------
    def _body(self, **fields: Any) -> dict[str, Any]:
        fields = {name: _plain(value) for name, value in fields.items()}
        return {"model": self.model, **fields} if self.model else fields

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return _checked(await self._http.post(path, json=body))

    async def _events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with self._http.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                _checked(response)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise APIError.from_body(response.status_code, chunk)
                yield chunk


def _plain(value: Any) -> Any:
    """A dataclass (StructuredOutputsParams) as the JSON object of its set fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                if getattr(value, f.name) != f.default}
    return value


def _checked(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if response.status_code >= 400:
        raise APIError.from_body(response.status_code, body)
    return body
