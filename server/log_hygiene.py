"""A server log that a client cannot flood or forge: text arguments are escaped (no raw line
breaks or control characters) and truncated, and a message repeated within an interval is
logged once, the next one carrying the count of those held back."""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.config import LOGGING_CONFIG

MAX_ARG_CHARS = 1000
REPEAT_INTERVAL_S = 10.0
MAX_TRACKED = 1024  # distinct messages remembered; beyond it the oldest are forgotten


def printable(text: str, limit: int = MAX_ARG_CHARS) -> str:
    """`text` on one line: control and other unprintable characters as escapes, cut at `limit`."""
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return cut if len(text) <= limit else f"{cut}...[{len(text) - limit} more characters]"


@dataclass(slots=True)
class _Window:
    opened: float
    held: int = 0


class LogHygiene(logging.Filter):
    """Attach to every handler (see `log_config`). Warnings and worse are rate-limited by
    logger, level, message template and, for exceptions, the exception's text."""

    def __init__(self, interval_s: float = REPEAT_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 min_level: int = logging.WARNING):
        super().__init__()
        self.interval_s, self.clock, self.min_level = interval_s, clock, min_level
        self.windows: dict[tuple, _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_hygienic", False):  # once, however many handlers see it
            record._hygienic = True
            _escape_args(record)
            if record.levelno >= self.min_level and not self._admit(record):
                record._held = True
        return not getattr(record, "_held", False)

    def _admit(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg), _exception_text(record))
        now = self.clock()
        window = self.windows.get(key)
        if window is not None and now - window.opened < self.interval_s:
            window.held += 1
            return False
        if window is not None and window.held:
            record.msg = f"{record.msg} [{window.held} more like this in the last {now - window.opened:.0f} s]"
        self.windows.pop(key, None)
        self.windows[key] = _Window(now)
        if len(self.windows) > MAX_TRACKED:
            del self.windows[next(iter(self.windows))]
        return True


def _escape_args(record: logging.LogRecord) -> None:
    if isinstance(record.args, tuple):
        record.args = tuple(printable(a) if isinstance(a, str) else a for a in record.args)
    elif isinstance(record.args, dict):
        record.args = {k: printable(v) if isinstance(v, str) else v for k, v in record.args.items()}
    elif not record.args and isinstance(record.msg, str):
        record.msg = printable(record.msg, limit=10 * MAX_ARG_CHARS)


def _exception_text(record: logging.LogRecord) -> str:
    exc = record.exc_info[1] if record.exc_info else None
    return f"{type(exc).__name__}: {exc}" if exc is not None else ""


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config, with LogHygiene on every handler, asyncpp's loggers at
    `level` and everything else (asyncio's accept errors, libraries) through the same handler."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"hygiene": {"()": LogHygiene}}
    for handler in config["handlers"].values():
        handler["filters"] = ["hygiene"]
    config["loggers"]["asyncpp"] = {"level": level.upper()}
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config
