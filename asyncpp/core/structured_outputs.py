"""vLLM's StructuredOutputsParams: the one constraint a request's output must follow (a JSON
schema, any JSON object, a regex, one of a few strings, an EBNF grammar, or an xgrammar
structural tag). Checked for shape here; compiled (and refused when it cannot be) by the
engine's grammar compiler (asyncpp/engine/grammar_compiler.py)."""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, fields
from typing import Any

from asyncpp.core.errors import InvalidRequest

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(slots=True)
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema (text or dict)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF) or Lark
    json_object: bool | None = None  # any JSON object
    structural_tag: str | dict | None = None  # xgrammar's structural tag (JSON text or dict)
    disable_any_whitespace: bool = False  # JSON without whitespace between tokens
    disable_additional_properties: bool = False  # objects may hold only the properties the schema names
    whitespace_pattern: str | None = None  # vLLM's (outlines only): refused here

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none is" if not given else f"{', '.join(given)} are"
            raise InvalidRequest(f"structured_outputs needs exactly one of {', '.join(KINDS)}; {what} set",
                                 param="structured_outputs")
        self._check_values()

    @classmethod
    def of(cls, value: StructuredOutputsParams | dict[str, Any]) -> StructuredOutputsParams:
        """The params from themselves or from a dict of their fields (vLLM's request body form)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidRequest("structured_outputs must be an object with one of "
                                 f"{', '.join(KINDS)}, got {type(value).__name__}", param="structured_outputs")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise InvalidRequest(f"structured_outputs has unknown field(s) {', '.join(map(str, unknown[:5]))}; "
                                 f"it takes {', '.join(sorted(names))}", param="structured_outputs")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def param(self) -> str:
        """The request field at fault when the constraint cannot be used."""
        return f"structured_outputs.{self.kind}"

    def spec(self) -> str:
        """The constraint as text (a dict as JSON, keys in their order: xgrammar keeps it)."""
        value = getattr(self, self.kind)
        if self.kind == "choice":
            return _json.dumps(value, ensure_ascii=False)
        if isinstance(value, dict):
            return _json.dumps(value, ensure_ascii=False)
        return "" if value is True else str(value)

    def _check_values(self) -> None:
        kind, value = self.kind, getattr(self, self.kind)

        def bad(why: str) -> InvalidRequest:
            return InvalidRequest(f"structured_outputs.{kind} {why}", param=f"structured_outputs.{kind}")

        if kind in ("json", "structural_tag"):
            if not isinstance(value, (str, dict)):
                raise bad(f"must be a JSON object or its text, got {type(value).__name__}")
            if isinstance(value, str):
                try:
                    parsed = _json.loads(value)
                except ValueError as e:
                    raise bad(f"is not valid JSON: {e}") from None
                if not isinstance(parsed, (dict, bool)):
                    raise bad(f"must be a JSON object, got {type(parsed).__name__}")
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise bad("must be a non-empty string")
            if "\x00" in value:
                raise bad("must not contain a NUL character")
        elif kind == "choice":
            if (not isinstance(value, list) or not value
                    or not all(isinstance(c, str) and c and "\x00" not in c for c in value)):
                raise bad("must be a non-empty list of non-empty strings")
        elif value is not True:
            raise bad("must be true when given")
        for flag in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidRequest(f"structured_outputs.{flag} must be true or false",
                                     param=f"structured_outputs.{flag}")
        if self.whitespace_pattern is not None:
            raise InvalidRequest("structured_outputs.whitespace_pattern is not supported (xgrammar has no "
                                 "whitespace pattern; disable_any_whitespace removes optional whitespace)",
                                 param="structured_outputs.whitespace_pattern")
