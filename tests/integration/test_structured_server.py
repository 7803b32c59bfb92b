"""Structured output and tool calling over HTTP on the bundled SmolLM2, as OpenAI clients use
them: JSON schemas sampled at temperature 1 (every output validates), vLLM's
`structured_outputs` field, tool calls through the `openai` client (named, required, auto;
streamed and not), tool results back through the template, and the refusals (bad, huge and
slow specs) that leave the server serving. One server for the module."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, BadRequestError

from asyncpp.engine_args import EngineArgs
from asyncpp.server.app import build_app
from asyncpp.server.settings import ServerSettings
from asyncpp.server.threaded import serve_in_thread
from asyncpp.testing.live_server import LiveServer

pytestmark = pytest.mark.anyio
CACHE_SIZE = 8
MODEL = "SmolLM2-135M-Instruct"

SCHEMAS = {
    "object": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"]},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
        "required": ["id", "tags"]}}, "required": ["user"]},
    "nullable": {"type": "object", "properties": {"nick": {"type": ["string", "null"], "maxLength": 8},
                                                  "score": {"anyOf": [{"type": "number", "minimum": 0,
                                                                       "maximum": 1}, {"type": "null"}]}},
                 "required": ["nick", "score"]},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                "required": ["code"]},
}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                                    "b": {"type": "integer", "minimum": -999, "maximum": 999}},
                   "required": ["a", "b"]}}}
NEG = {"type": "function", "function": {
    "name": "negate", "parameters": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99,
                                                                             "maximum": 99}}, "required": ["x"]}}}
TOOLS = [ADD, NEG]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is 20 plus 22? Use a tool."}]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    args = EngineArgs(model=None, dtype="float32", max_model_len=1024, kv_cache_memory="256MiB",
                      structured_outputs_timeout=2.0, structured_outputs_cache_size=CACHE_SIZE)
    app = build_app(args, settings=ServerSettings(enable_auto_tool_choice=True, tool_call_parser="hermes"))
    with serve_in_thread(app) as url:
        yield LiveServer(url, app)


@pytest.fixture
def openai(server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)


NAMED = {"type": "function", "function": {"name": "add"}}
WRITTEN = '<tool_call>{"name":"add","arguments":{"a":20,"b":22}}</tool_call>'
HISTORY = ASK + [{"role": "assistant", "content": None, "tool_calls": [
    {"id": "call-1", "type": "function", "function": {"name": "add", "arguments": '{"a": 20, "b": 22}'}}]},
    {"role": "tool", "tool_call_id": "call-1", "content": "42"}]


@pytest.fixture(scope="module")
def answers(server) -> dict[str, Any]:
    """Every generating request of this module at once (one batch: its longest answer is the wait)."""
    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
    chat, complete = client.chat.completions.create, client.completions.create
    force = {"structured_outputs": {"regex": WRITTEN.replace("{", r"\{").replace("}", r"\}")}}
    calls = {
        **{f"schema:{name}": chat(model=MODEL, messages=[{"role": "user", "content": f"A {name} example as JSON."}],
                                  temperature=1.0, max_tokens=150, seed=1, response_format={
                                      "type": "json_schema", "json_schema": {"name": name, "schema": schema}})
           for name, schema in SCHEMAS.items()},
        **{f"complete:{kind}": complete(model=MODEL, prompt="Answer:", max_tokens=40, temperature=1.0,
                                        seed=4, extra_body={"structured_outputs": {kind: spec}})
           for kind, spec in (("regex", "[0-9]{2}-[a-z]{3}"), ("choice", ["yes", "no"]),
                              ("grammar", 'root ::= "v" [0-9] "." [0-9]'))},
        "complete:json_object": complete(model=MODEL, prompt="JSON:", max_tokens=30, temperature=0,
                                         extra_body={"response_format": {"type": "json_object"}}),
        "results": chat(model=MODEL, messages=HISTORY, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0),
    }
    for stream in (False, True):
        tag = ":stream" if stream else ""
        calls[f"named{tag}"] = chat(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, temperature=1.0,
                                    max_tokens=120, seed=2, stream=stream)
        calls[f"required{tag}"] = chat(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=1.0, max_tokens=200, seed=3, parallel_tool_calls=stream,
                                       stream=stream)
        calls[f"auto{tag}"] = chat(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, extra_body=force,
                                   stream=stream)
    results: dict[str, Any] = {}

    async def run(key: str, call: Any) -> None:
        answer = await call
        results[key] = [chunk async for chunk in answer] if key.endswith(":stream") else answer

    async def all_at_once() -> None:
        async with anyio.create_task_group() as tg:
            for key, call in calls.items():
                tg.start_soon(run, key, call)

    anyio.run(all_at_once)
    return results


def assert_calls_valid(calls) -> None:
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def streamed_calls(chunks) -> tuple[list[dict], str | None, str]:
    """The tool calls a streamed answer adds up to (by index, as the openai client assembles
    them), its finish reason and its content."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"name": "", "arguments": ""})
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


def test_json_schema_outputs_validate_at_temperature_one(answers):
    for name, schema in SCHEMAS.items():
        choice = answers[f"schema:{name}"].choices[0]
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_vllm_structured_outputs_field_on_completions(answers):
    regex, choice, grammar = (answers[f"complete:{kind}"].choices[0] for kind in ("regex", "choice", "grammar"))
    assert re.fullmatch("[0-9]{2}-[a-z]{3}", regex.text) and regex.finish_reason == "stop"
    assert choice.text in ("yes", "no") and re.fullmatch(r"v[0-9]\.[0-9]", grammar.text)
    obj = answers["complete:json_object"].choices[0]
    assert obj.finish_reason == "length" or isinstance(json.loads(obj.text), dict)


@pytest.mark.parametrize("choice", ["named", "required"])
def test_tool_calls_through_the_openai_client(answers, choice):
    whole = answers[choice].choices[0]
    assert_calls_valid(whole.message.tool_calls)
    assert len(whole.message.tool_calls) == 1  # parallel_tool_calls=False
    assert choice == "required" or whole.message.tool_calls[0].function.name == "add"
    assert whole.finish_reason == ("stop" if choice == "named" else "tool_calls")
    calls, finish, _ = streamed_calls(answers[f"{choice}:stream"])
    assert calls and finish == ("stop" if choice == "named" else "tool_calls")
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


def test_auto_tool_choice_reads_calls_from_free_text(answers):
    whole = answers["auto"].choices[0]
    call = whole.message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("add", {"a": 20, "b": 22})
    assert whole.finish_reason == "tool_calls" and not whole.message.content
    calls, finish, content = streamed_calls(answers["auto:stream"])
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("add", {"a": 20, "b": 22})]
    assert finish == "tool_calls" and content == ""


def test_tool_results_go_back_through_the_template(answers):
    message = answers["results"].choices[0].message
    assert message.content and message.tool_calls is None


def slow_schema() -> dict:
    """~5 s to compile over SmolLM2's vocabulary (each long string pattern is an automaton; 20
    of them took 1.1 s on a 2-core EPYC, 40 took 2.0 s), well past the server's 2 s deadline."""
    return {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{100}"} for i in range(100)}}


@pytest.mark.parametrize("body,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
     "response_format", "JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                                        "multipleOf": 3}}}},
     "response_format", "multipleOf"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "regular expression"),
    ({"structured_outputs": {"json": {"enum": ["v" * 100] * 1000}}}, "structured_outputs.json", "characters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "slow", "schema": slow_schema()}}},
     "response_format", "did not compile within 2 s"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array",
                                                                             "uniqueItems": True}}}],
      "tool_choice": "required"}, "tools", "uniqueItems"),
])
async def test_bad_constraints_are_400_naming_the_field_and_the_server_serves_on(server, body, param, words):
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
        refused = await http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == param and words in error["message"], error
        fine = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2,
                                                         "structured_outputs": {"choice": ["ok"]}})
    assert fine.status_code == 200 and fine.json()["choices"][0]["text"] == "ok"


async def test_many_distinct_schemas_at_once_keep_the_cache_bounded(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
        async def ask(i: int) -> None:
            schema = {"type": "object", "properties": {f"field_{i}": {"enum": [i]}}, "required": [f"field_{i}"]}
            response = await http.post("/v1/completions", json={
                "prompt": "JSON:", "max_tokens": 30, "structured_outputs": {"json": schema,
                                                                            "disable_any_whitespace": True}})
            assert json.loads(response.json()["choices"][0]["text"]) == {f"field_{i}": i}

        async with anyio.create_task_group() as tg:
            for i in range(2 * CACHE_SIZE):
                tg.start_soon(ask, i)
    assert server.engine.grammars is not None and server.engine.grammars.num_cached <= CACHE_SIZE


async def test_unknown_tool_choice_without_tools_and_auto_without_flags(openai, server):
    with pytest.raises(BadRequestError, match="tool_choice"):
        await openai.chat.completions.create(model=MODEL, messages=ASK, tool_choice="required", max_tokens=2)
    settings = server.app.state.server.settings
    settings.enable_auto_tool_choice = False
    try:
        with pytest.raises(BadRequestError, match="--enable-auto-tool-choice"):
            await openai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=2)
    finally:
        settings.enable_auto_tool_choice = True
