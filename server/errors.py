"""Errors as OpenAI shapes them: {"error": {"message", "type", "param", "code"}}, with the
HTTP status in `code`, and the mapping from exception types to statuses.

A 5xx tells the client a short message and an `error_id`; the server log has the same id
with the full text (an engine failure may carry a stage's traceback and file paths)."""
from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field
from http import HTTPStatus

from starlette.responses import JSONResponse

from asyncpp.core.errors import EngineDeadError, InvalidRequest, QueueFullError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
INTERNAL_MESSAGE = "internal server error"
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.+~-]+){2,}[\\/]?")
MAX_SUMMARY_CHARS = 200
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


@dataclass(slots=True)
class ServerError(Exception):
    status: int
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error_id: str | None = None

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"

    @property
    def type(self) -> str:
        return _ERROR_TYPES.get(self.status) or _type_from_phrase(self.status)

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        if self.error_id is not None:
            error["error_id"] = self.error_id
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _type_from_phrase(status: int) -> str:
    name = HTTPStatus(status).phrase.replace(" ", "")
    return name if name.endswith("Error") else name + "Error"


class ServerShuttingDown(EngineDeadError):
    """What requests in flight end with as the server begins to shut down."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down", permanent=True)


def to_server_error(exc: Exception) -> ServerError:
    """The status a client gets for what the engine (or SamplingParams) raised, by its type."""
    if isinstance(exc, ServerShuttingDown):  # logged once, not once per request
        return ServerError(503, str(exc))
    if isinstance(exc, InvalidRequest):
        return ServerError(400, str(exc), exc.param)
    if isinstance(exc, QueueFullError):
        return unavailable(f"the server is at capacity: {exc}")
    if isinstance(exc, EngineDeadError):
        return engine_unhealthy(exc)
    return internal_error(exc)


def internal_error(exc: BaseException) -> ServerError:
    """A 500 that tells the client nothing of the exception: its text may hold paths and internals."""
    error_id = new_error_id()
    logger.error("unexpected error [error_id %s]", error_id, exc_info=exc)
    return ServerError(500, f"{INTERNAL_MESSAGE} (error_id {error_id}; the server log has the details)",
                       error_id=error_id)


def engine_unhealthy(exc: BaseException) -> ServerError:
    """A 503 with the first line of the engine's error, file paths taken out; `Retry-After`
    only while the engine can recover (not once its restarts are spent or it stopped)."""
    error_id = new_error_id()
    logger.error("engine unhealthy [error_id %s]: %s", error_id, exc)
    permanent = getattr(exc, "permanent", False)
    state = "down for good" if permanent else "not healthy"
    return unavailable(f"the engine is {state}: {summary(exc)} (error_id {error_id}; the server log has the "
                       "details)", error_id, retry=not permanent)


def unavailable(message: str, error_id: str | None = None, retry: bool = True) -> ServerError:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else {}
    return ServerError(503, message, headers=headers, error_id=error_id)


def summary(exc: BaseException) -> str:
    """The exception's first line without file paths, short: what a client may read."""
    lines = str(exc).strip().splitlines()
    first = _PATH.sub("<path>", lines[0] if lines else type(exc).__name__)
    return first if len(first) <= MAX_SUMMARY_CHARS else first[:MAX_SUMMARY_CHARS] + "..."


def new_error_id() -> str:
    return secrets.token_hex(6)
