"""One chat choice's output read as an assistant message: the reasoning split off (with
--reasoning-parser) and tool calls read out of the content (with a tool plan), whole or as
streamed deltas. Reasoning comes back under both names clients read: `reasoning_content`
(DeepSeek's, and vLLM's before 0.11) and `reasoning` (vLLM's now)."""
from __future__ import annotations

from typing import Any

from asyncpp.server.reasoning import ReasoningSplitter
from asyncpp.server.tool_parsers import ToolCall, ToolParser


class MessageReader:
    def __init__(self, reasoning: ReasoningSplitter | None, tools: ToolParser | None, include_reasoning: bool = True):
        self._reasoning, self._tools, self._include_reasoning = reasoning, tools, include_reasoning
        self.num_calls = 0

    def message(self, text: str) -> dict[str, Any]:
        """The whole message of a finished choice."""
        reasoning, content, calls = self._read(text, finished=True)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else content)}
        self._add_reasoning(message, reasoning, whole=True)
        if calls:
            message["tool_calls"] = [call.as_dict() for call in calls]
        return message

    def delta(self, text: str, finished: bool) -> dict[str, Any]:
        """The next streamed delta: `text` is the choice's new text; `finished` flushes what was held."""
        reasoning, content, calls = self._read(text, finished)
        delta: dict[str, Any] = {}
        if content or not (reasoning or calls):
            delta["content"] = content
        self._add_reasoning(delta, reasoning, whole=False)
        if calls:
            delta["tool_calls"] = [{"index": self.num_calls - len(calls) + i, **call.as_dict()}
                                   for i, call in enumerate(calls)]
        return delta

    def _read(self, text: str, finished: bool) -> tuple[str, str, list[ToolCall]]:
        reasoning, content = self._reasoning.feed(text) if self._reasoning else ("", text)
        if finished and self._reasoning:
            rest = self._reasoning.finish()
            reasoning, content = reasoning + rest[0], content + rest[1]
        calls: list[ToolCall] = []
        if self._tools is not None:
            content, calls = self._tools.feed(content)
            if finished:
                more_content, more_calls = self._tools.finish()
                content, calls = content + more_content, calls + more_calls
        self.num_calls += len(calls)
        return reasoning, content, calls

    def _add_reasoning(self, message: dict[str, Any], reasoning: str, whole: bool) -> None:
        if self._reasoning is None or not self._include_reasoning or not (reasoning or whole):
            return
        message["reasoning_content"] = message["reasoning"] = reasoning or None
