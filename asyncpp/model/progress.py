"""Progress of long work (converting the bundled model, loading weights): a bar when stderr
is a terminal, else a log line every few seconds; work that ends quickly shows nothing."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

log = logging.getLogger("asyncpp")


@dataclass(slots=True)
class Progress:
    desc: str
    total: float
    unit: str = ""  # "B": amounts are bytes, shown scaled (MB, GB)
    every_s: float = 10.0  # between log lines; 0: a line at every update
    bar: Any = None  # the tqdm bar on a terminal
    done: float = 0.0
    note: str = ""
    start: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    lines: int = 0

    def update(self, amount: float = 1, note: str | None = None) -> None:
        """`amount` more done; `note` names what runs now (a step of several)."""
        self.done += amount
        if note is not None:
            self.note = note
        if self.bar is not None:
            if note is not None:
                self.bar.set_postfix_str(note)
            self.bar.update(amount)
        elif self.done < self.total and time.monotonic() - self.last_line >= self.every_s:
            self._line(f"{self._amount()}{': ' + self.note if self.note else ''}")

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines:  # someone watched it run: say that it ended
            self._line("done")

    def _amount(self) -> str:
        if self.unit == "B":
            return f"{self.done / 2**20:.0f} / {self.total / 2**20:.0f} MiB"
        return f"{self.done:g}/{self.total:g}{' ' + self.unit if self.unit else ''}"

    def _line(self, text: str) -> None:
        self.last_line = time.monotonic()
        self.lines += 1
        message = f"{self.desc}: {text} ({self.last_line - self.start:.1f} s)"
        if log.hasHandlers():
            log.info("%s", message)
        else:  # a plain script configured no logging: INFO would vanish
            print(message, file=sys.stderr, flush=True)


@contextmanager
def progress(desc: str, total: float, *, unit: str = "", delay_s: float = 1.0, every_s: float = 10.0,
             position: int = 0) -> Iterator[Progress]:
    """A bar that appears after `delay_s` (on a terminal), or a log line every `every_s`.
    `position`: the bar's line, for several processes drawing at once (pipeline stages)."""
    tracker = Progress(desc, total, unit, every_s)
    if sys.stderr is not None and sys.stderr.isatty():
        tracker.bar = tqdm(total=total, desc=desc, unit=unit or "it", unit_scale=unit == "B", delay=delay_s,
                           position=position, leave=position == 0, dynamic_ncols=True)
    try:
        yield tracker
    finally:
        tracker.finish()
