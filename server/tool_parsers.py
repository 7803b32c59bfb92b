"""`--tool-call-parser`: tool calls read out of a model's text, whole or as it streams.

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks anywhere in
  the text (Hermes, Qwen2.5/3, SmolLM2's tool template); the text around them is content.
- `llama3_json`: the whole output is one or more `{"name": ..., "parameters": {...}}`
  objects (separated by `;` or whitespace, optionally after `<|python_tag|>`); any other
  output is content.

Each parser also names the xgrammar model format whose structural tag makes the model write
exactly its syntax (server/tools.py constrains `tool_choice: required` and named choices
with it). Streaming holds text back only while it may still be the start of a call; a call
is sent whole once its closing tag (or the output's end) comes."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from asyncpp.engine.stop_checker import hold_back_length


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_from(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | None:
    """A call from a decoded `{"name": ..., <args key>: {...}}`, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    """One choice's output: `feed` text deltas, then `finish`; each returns (content, calls)."""
    name: ClassVar[str]
    xgrammar_format: ClassVar[str]  # xgrammar.get_model_structural_tag's model name
    separator: ClassVar[str]  # between parallel calls, where the output is calls only

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """A whole output's (content, calls)."""
        content, calls = self.feed(text)
        rest, more = self.finish()
        return content + rest, calls + more


class HermesToolParser(ToolParser):
    name, xgrammar_format, separator = "hermes", "qwen_3", "\n"
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self._pending = ""  # held content that may begin a call, or the open call's text
        self._in_call = False

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        text, content, calls = self._pending + delta, [], []
        while True:
            if not self._in_call:
                at = text.find(self.START)
                if at < 0:
                    keep = hold_back_length(text, [self.START])
                    content.append(text[:len(text) - keep])
                    self._pending = text[len(text) - keep:] if keep else ""
                    return "".join(content), calls
                content.append(text[:at])
                text, self._in_call = text[at + len(self.START):], True
            at = text.find(self.END)
            if at < 0:
                self._pending = text
                return "".join(content), calls
            body, text, self._in_call = text[:at], text[at + len(self.END):], False
            call = _decode_call(body)
            if call is None:  # not a call after all: show it as written
                content.append(f"{self.START}{body}{self.END}")
            else:
                calls.append(call)

    def finish(self) -> tuple[str, list[ToolCall]]:
        pending, self._pending = self._pending, ""
        if not self._in_call:
            return pending, []
        self._in_call = False
        call = _decode_call(pending)  # the output ended inside a call (EOS before the closing tag)
        return ("", [call]) if call is not None else (self.START + pending, [])


class Llama3JsonToolParser(ToolParser):
    name, xgrammar_format, separator = "llama3_json", "llama", "; "
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self._text = ""
        self._calls_maybe: bool | None = None  # undecided until the first visible character

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._text += delta
        if self._calls_maybe is None:
            head = self._text.lstrip()
            if not head or self.PYTHON_TAG.startswith(head):
                return "", []
            self._calls_maybe = head.startswith(("{", self.PYTHON_TAG))
            if not self._calls_maybe:
                text, self._text = self._text, ""
                return text, []
        if self._calls_maybe:
            return "", []  # a call's JSON: read whole at the end
        text, self._text = self._text, ""
        return text, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        text, self._text = self._text, ""
        if not self._calls_maybe:
            return text, []
        calls = _decode_calls(text.strip().removeprefix(self.PYTHON_TAG))
        return ("", calls) if calls else (text, [])


def _decode_call(body: str) -> ToolCall | None:
    try:
        return call_from(json.loads(body), ("arguments", "parameters"))
    except ValueError:
        return None


def _decode_calls(text: str) -> list[ToolCall]:
    """Every `{...}` object of `text` as a call (separated by ; or whitespace); [] if any is not one."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return calls
        try:
            obj, at = decoder.raw_decode(text, at)
        except ValueError:
            return []
        call = call_from(obj, ("parameters", "arguments"))
        if call is None:
            return []
        calls.append(call)


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesToolParser, Llama3JsonToolParser)}
