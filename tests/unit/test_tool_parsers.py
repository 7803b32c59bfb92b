"""Reading tool calls and reasoning out of model text: whole, and streamed in pieces of any
size (the streamed deltas add up to the whole answer)."""
from __future__ import annotations

import json

import pytest

from asyncpp.engine.reasoning import REASONING_PARSERS
from asyncpp.server.chat_message import MessageReader
from asyncpp.server.reasoning import ReasoningSplitter, split_reasoning
from asyncpp.server.tool_parsers import HermesToolParser, Llama3JsonToolParser, ToolParser
from asyncpp.server.tools import ToolPlan

THINK = REASONING_PARSERS["deepseek_r1"]
HERMES = ('Let me add. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
          '<tool_call>{"name": "neg", "arguments": "{\\"x\\": 3}"}</tool_call> done <tool_c')


def streamed(parser: ToolParser, text: str, step: int) -> tuple[str, list]:
    content, calls = "", []
    for at in range(0, len(text), step):
        piece, found = parser.feed(text[at:at + step])
        content, calls = content + piece, calls + found
    piece, found = parser.finish()
    return content + piece, calls + found


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_hermes_calls_are_read_out_of_the_text(step):
    content, calls = streamed(HermesToolParser(), HERMES, step)
    assert content == "Let me add. \n done <tool_c"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2}), ("neg", {"x": 3})]


def test_hermes_keeps_what_is_not_a_call_and_reads_a_call_cut_by_the_end():
    assert HermesToolParser().parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    content, calls = HermesToolParser().parse('<tool_call>{"name": "f", "arguments": {}}')
    assert content == "" and calls[0].name == "f" and calls[0].arguments == "{}"


@pytest.mark.parametrize("step", [1, 1000])
def test_llama3_json_reads_whole_outputs_of_calls_only(step):
    text = '<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "f", "parameters": {}}'
    content, calls = streamed(Llama3JsonToolParser(), text, step)
    assert content == "" and [c.name for c in calls] == ["add", "f"]
    assert streamed(Llama3JsonToolParser(), "Hi {there}", step) == ("Hi {there}", [])
    assert streamed(Llama3JsonToolParser(), '{"name": "add"} trailing', step) == ('{"name": "add"} trailing', [])


@pytest.mark.parametrize("step", [1, 2, 1000])
def test_reasoning_splits_at_the_end_marker(step):
    text = "<think>\nfirst, 1 < 2</think>The answer</thi"
    splitter = ReasoningSplitter(THINK)
    parts = [splitter.feed(text[at:at + step]) for at in range(0, len(text), step)] + [splitter.finish()]
    assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == ("\nfirst, 1 < 2", "The answer</thi")
    assert split_reasoning("still thinking", THINK) == ("still thinking", "")
    assert split_reasoning("no thinking here", THINK, reasoning=False) == ("", "no thinking here")


def test_a_streamed_message_adds_up_to_the_whole_one():
    text = "<think>hmm</think>" + HERMES
    plan = ToolPlan(HermesToolParser, "auto", None)
    whole = MessageReader(ReasoningSplitter(THINK), plan.parser()).message(text)
    reader = MessageReader(ReasoningSplitter(THINK), plan.parser())
    deltas = [reader.delta(text[at:at + 4], at + 4 >= len(text)) for at in range(0, len(text), 4)]
    assert "".join(d.get("content") or "" for d in deltas) == whole["content"] == "Let me add. \n done <tool_c"
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == whole["reasoning_content"] == "hmm"
    streamed_calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in streamed_calls] == [0, 1]
    assert [c["function"] for c in streamed_calls] == [c["function"] for c in whole["tool_calls"]]
    assert plan.finish_reason("stop", reader.num_calls) == "tool_calls"
    assert ToolPlan(HermesToolParser, "named", None).finish_reason("stop", 1) == "stop"
    assert ToolPlan(HermesToolParser, "required", None).finish_reason("length", 0) == "length"
