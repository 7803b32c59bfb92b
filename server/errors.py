"""Errors as OpenAI shapes them: {"error": {"message", "type", "param", "code"}}, with the
HTTP status in `code`, and the mapping from engine exceptions to statuses."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from http import HTTPStatus

from starlette.responses import JSONResponse

from asyncpp.core.errors import EngineDeadError, QueueFullError

logger = logging.getLogger("server")

RETRY_AFTER_S = 1
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 503: "ServiceUnavailableError"}
_SAMPLING_FIELD = re.compile(r"SamplingParams\.(\w+)")


@dataclass(slots=True)
class ServerError(Exception):
    status: int
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"

    @property
    def type(self) -> str:
        return _ERROR_TYPES.get(self.status, HTTPStatus(self.status).phrase.replace(" ", "") + "Error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def to_server_error(exc: Exception) -> ServerError:
    """The status a client gets for what the engine (or SamplingParams) raised."""
    if isinstance(exc, QueueFullError):
        return unavailable(f"the server is at capacity: {exc}")
    if isinstance(exc, EngineDeadError):
        return unavailable(f"the engine is not healthy: {exc}")
    if isinstance(exc, ValueError):
        match = _SAMPLING_FIELD.search(str(exc))
        param = match.group(1) if match else ("prompt" if "prompt" in str(exc) else None)
        return ServerError(400, str(exc), param)
    logger.exception("unexpected error", exc_info=exc)
    return ServerError(500, f"internal error: {type(exc).__name__}: {exc}")


def unavailable(message: str) -> ServerError:
    return ServerError(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})
