"""Tool calling for /v1/chat/completions, with vLLM's flags and rules.

- `tool_choice: "none"`: the template still sees the tools; the output is plain content.
- `"auto"` (the default when tools are given): needs `--enable-auto-tool-choice` and a
  `--tool-call-parser`; the model writes freely and the parser reads calls out of its text.
- `"required"` and a named function: the output is constrained by a grammar (an xgrammar
  structural tag in the parser's own syntax: `hermes` when no parser is set), so every call
  names a given function and its arguments validate against that function's parameters.
  The same parser reads the calls back.

`finish_reason` is "tool_calls" when auto calls were made, or for `required` once the output
stopped; a named choice finishes with "stop" (as OpenAI and vLLM)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from asyncpp.core.structured_outputs import StructuredOutputsParams
from asyncpp.engine.json_schema_check import unsupported_feature
from asyncpp.server.errors import ServerError
from asyncpp.server.log_hygiene import printable
from asyncpp.server.tool_parsers import TOOL_PARSERS, HermesToolParser, ToolParser

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request's tools are handled: which parser reads the calls, and the grammar."""
    parser: type[ToolParser]
    choice: str  # "auto" | "required" | "named"
    structured_outputs: StructuredOutputsParams | None  # the grammar for required / named

    def finish_reason(self, reason: str | None, num_calls: int) -> str | None:
        if reason is None or self.choice == "named":
            return reason
        if (self.choice == "auto" and num_calls) or (self.choice == "required" and reason == "stop"):
            return "tool_calls"
        return reason


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
               parallel_tool_calls: bool | None, auto_tools: bool, parser_name: str | None,
               max_whitespace: int | None = None) -> ToolPlan | None:
    """The plan for a request's (validated) tools; None when no tool may be called.
    `max_whitespace`: the engine's bound on whitespace runs inside the arguments' JSON."""
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if not tools or choice == "none":
        return None
    if choice == "auto":
        if not auto_tools or parser_name is None:
            raise ServerError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                   "to be set", "tool_choice")
        return ToolPlan(TOOL_PARSERS[parser_name], "auto", None)
    parser = TOOL_PARSERS[parser_name] if parser_name is not None else HermesToolParser
    for tool in tools:
        _check_parameters(tool)
    named = isinstance(choice, dict)
    tag = xgr.get_model_structural_tag(parser.xgrammar_format, tools=[_with_parameters(t) for t in tools],
                                       tool_choice=choice, reasoning=False,
                                       parallel_tool_calls=parallel_tool_calls is not False,
                                       max_whitespace_cnt=max_whitespace or None).model_dump(mode="json")
    fmt = tag["format"]
    if fmt["type"] == "triggered_tags":  # required: calls only, none of the free text xgrammar allows around them
        tag["format"] = {"type": "tags_with_separator", "tags": fmt["tags"], "separator": parser.separator,
                         "at_least_one": True, "stop_after_first": fmt["stop_after_first"]}
    return ToolPlan(parser, "named" if named else "required", StructuredOutputsParams(structural_tag=tag))


def _with_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    """A function without parameters takes an empty object (as vLLM reads it)."""
    function = tool["function"]
    if function.get("parameters") is not None:
        return tool
    return {**tool, "function": {**function, "parameters": EMPTY_PARAMETERS}}


def _check_parameters(tool: dict[str, Any]) -> None:
    function = tool["function"]
    why = unsupported_feature(function.get("parameters") or EMPTY_PARAMETERS)
    if why is not None:
        name = printable(function["name"], 64)
        raise ServerError(400, f"tools: the parameters of {name!r} use {why}, which the grammar engine (xgrammar) "
                               "cannot enforce", "tools")
