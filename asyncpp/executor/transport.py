"""A backend is only a transport to the ranks; the Executor drives the pipeline over it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from asyncpp.core.config import EngineConfig
from asyncpp.core.messages import FromRank, ToRank
from asyncpp.executor.failures import Death
from asyncpp.worker.worker import RunnerFactory


@dataclass(slots=True)
class Polled:
    messages: list[FromRank] = field(default_factory=list)
    deaths: list[Death] = field(default_factory=list)


class Transport(ABC):
    """Start the ranks, send each one every message, hear their replies and deaths, stop.

    `poll` blocks and runs in a worker thread; every other method is called from the
    event loop's thread (`start`, `send`) or from a worker thread (`stop`, `kill`) while
    `poll` may be running.
    """

    @abstractmethod
    def __init__(self, config: EngineConfig, runner_factory: RunnerFactory):
        """Each rank runs `runner_factory(config, its StageSpec, its TP group)`."""

    @abstractmethod
    async def start(self) -> None:
        """Launch every rank; each answers Ready (or Failure) on its own, through `poll`."""

    @abstractmethod
    def send(self, msg: ToRank) -> None:
        """Give `msg` to every rank, in order, without blocking. A rank that is gone is
        skipped: `poll` reports its death."""

    @abstractmethod
    def poll(self, timeout: float | None) -> Polled:
        """Wait until a rank answers or dies (or `timeout`, or `stop`), and return what came."""

    @abstractmethod
    def stop(self, grace_s: float) -> None:
        """Ask every rank to stop, wait up to `grace_s`, kill the rest, release everything
        (a running `poll` returns). Blocks."""

    @abstractmethod
    def kill(self) -> None:
        """Take every rank down now (after a failure). Blocks."""

    @abstractmethod
    def pids(self) -> list[int]:
        """Each rank's process id, by rank."""
