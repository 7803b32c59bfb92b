"""Errors as OpenAI shapes them: {"error": {"message", "type", "param", "code"}}, with the
HTTP status in `code`, and the mapping from exception types to statuses."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from http import HTTPStatus

from starlette.responses import JSONResponse

from asyncpp.core.errors import EngineDeadError, InvalidRequest, QueueFullError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
INTERNAL_MESSAGE = "internal server error; the server log has the details"
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


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
        return _ERROR_TYPES.get(self.status) or _type_from_phrase(self.status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _type_from_phrase(status: int) -> str:
    name = HTTPStatus(status).phrase.replace(" ", "")
    return name if name.endswith("Error") else name + "Error"


def to_server_error(exc: Exception) -> ServerError:
    """The status a client gets for what the engine (or SamplingParams) raised, by its type."""
    if isinstance(exc, InvalidRequest):
        return ServerError(400, str(exc), exc.param)
    if isinstance(exc, QueueFullError):
        return unavailable(f"the server is at capacity: {exc}")
    if isinstance(exc, EngineDeadError):
        return unavailable(f"the engine is not healthy: {exc}")
    logger.exception("unexpected error", exc_info=exc)
    return internal_error()


def internal_error() -> ServerError:
    """A 500 that tells the client nothing of the exception: its text may hold paths and internals."""
    return ServerError(500, INTERNAL_MESSAGE)


def unavailable(message: str) -> ServerError:
    return ServerError(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})
