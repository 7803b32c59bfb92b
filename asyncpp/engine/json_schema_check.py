"""JSON-schema features xgrammar would silently ignore (so an output could break the schema):
refused up front, as vLLM refuses them for xgrammar (vLLM falls back to another engine;
asyncpp has only xgrammar). The list follows vLLM 0.32's `has_xgrammar_unsupported_json_features`."""
from __future__ import annotations

from typing import Any

MAX_NESTING = 64  # objects and arrays inside one another, as vLLM's MAX_STRUCTURED_OUTPUT_JSON_NESTING
# String formats xgrammar's JSON-schema converter enforces.
STRING_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
                            "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})


def unsupported_feature(schema: Any) -> str | None:
    """What of `schema` the grammar cannot enforce, in words; None when it can enforce it all."""
    if _depth(schema) > MAX_NESTING:
        return f"nesting deeper than {MAX_NESTING} levels"
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        why = _node_problem(node)
        if why is not None:
            return why
        stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
    return None


def _node_problem(node: dict[str, Any]) -> str | None:
    types = _types(node)
    if types & {"integer", "number"} and "multipleOf" in node:
        return "multipleOf"
    if "array" in types:
        for key in ("uniqueItems", "contains", "minContains", "maxContains"):
            if key in node:
                return f"{key} on an array"
    if "string" in types:
        if "format" in node and node["format"] not in STRING_FORMATS:
            return f"string format {str(node['format'])[:40]!r}"
        if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
            return "a string pattern or format together with minLength/maxLength"
    if "object" in types:
        names, patterns = node.get("propertyNames"), node.get("patternProperties")
        if "propertyNames" in node and (
                "properties" in node or "patternProperties" in node
                or node.get("unevaluatedProperties", True) is not True
                or (isinstance(names, dict) and ("pattern" in names or "format" in names)
                    and ("minLength" in names or "maxLength" in names))):
            return "propertyNames together with properties, patternProperties, unevaluatedProperties or length bounds"
        if isinstance(patterns, dict) and ("properties" in node or len(patterns) > 1):
            return "patternProperties together with properties, or more than one of them"
    all_of = node.get("allOf")
    if isinstance(all_of, list) and len(all_of) >= 2:
        return "allOf with several schemas"
    return None


def _types(node: dict[str, Any]) -> set[str]:
    kind = node.get("type")
    if isinstance(kind, str):
        return {kind}
    return {k for k in kind if isinstance(k, str)} if isinstance(kind, list) else set()


def _depth(value: Any) -> int:
    """Levels of objects and arrays, counted without recursion (a hostile schema may be deep)."""
    deepest, level = 0, [value]
    while level:
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))] if deepest <= MAX_NESTING else []
        deepest += 1
    return deepest
