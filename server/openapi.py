"""The HTTP API as an OpenAPI 3.1 document (GET /openapi.json): request bodies are the pydantic
models' JSON schemas, and every route lists the error statuses it can answer."""
from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from asyncpp import __version__

# What any route may answer: a Host this server does not answer to, and the unexpected.
COMMON_ERRORS = (421, 500)
BODY_ERRORS = (400, 408, 413, 415)
REF = "#/components/schemas/{model}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    method: str
    summary: str
    body: type[BaseModel] | None = None
    ok_media: tuple[str, ...] = ("application/json",)
    errors: tuple[int, ...] = ()
    open: bool = False  # needs no API key
    dev: bool = False  # served only with --enable-dev-endpoints (as vLLM's VLLM_SERVER_DEV_MODE)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int
    error_id: str | None = None  # 5xx only: the server log has the same id


class ErrorResponse(BaseModel):
    error: ErrorDetail


def openapi_document(endpoints: list[Endpoint], *, auth: bool, maxima: dict[str, int] | None = None
                     ) -> dict[str, Any]:
    """`maxima`: upper bounds of integer fields that the engine's settings impose (n, logprobs)."""
    bodies = sorted({e.body for e in endpoints if e.body is not None}, key=lambda m: m.__name__)
    _, schemas = models_json_schema([(m, "validation") for m in [*bodies, ErrorResponse]], ref_template=REF)
    for schema in schemas.get("$defs", {}).values():
        _bound(schema, maxima or {})
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint, auth)
    document = {"openapi": "3.1.0", "info": {"title": "asyncpp", "version": __version__},
                "paths": paths, "components": {"schemas": schemas.get("$defs", {})}}
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document


def _bound(schema: dict[str, Any], maxima: dict[str, int]) -> None:
    for name, prop in schema.get("properties", {}).items():
        if name in maxima and '"integer"' in json.dumps(prop):  # numeric keywords pass other types by
            prop["maximum"] = maxima[name]


def _operation(endpoint: Endpoint, auth: bool) -> dict[str, Any]:
    errors = set(COMMON_ERRORS) | set(endpoint.errors) | (set(BODY_ERRORS) if endpoint.body else set())
    if auth and not endpoint.open:
        errors.add(401)
    ok: dict[str, Any] = {"description": "OK"}
    if endpoint.ok_media:
        ok["content"] = {media: {"schema": {}} for media in endpoint.ok_media}
    operation: dict[str, Any] = {
        "summary": endpoint.summary,
        "operationId": endpoint.method.lower() + endpoint.path.replace("/", "_").replace(".", "_"),
        "responses": {"200": ok, **{str(status): _error(status) for status in sorted(errors)}}}
    if endpoint.body is not None:
        schema = {"$ref": REF.format(model=endpoint.body.__name__)}
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    if auth:
        operation["security"] = [] if endpoint.open else [{"bearer": []}]
    return operation


def _error(status: int) -> dict[str, Any]:
    schema = {"$ref": REF.format(model=ErrorResponse.__name__)}
    return {"description": HTTPStatus(status).phrase, "content": {"application/json": {"schema": schema}}}
