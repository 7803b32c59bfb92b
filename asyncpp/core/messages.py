"""Typed messages between the engine's executor and its ranks, the same under every
transport (pipes, Ray actor calls, an in-process thread)."""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

from asyncpp.core.config import EngineConfig
from asyncpp.core.microbatch import MicroBatch, StepOutput
from asyncpp.core.placement import RankPlacement


# -- engine -> every rank ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Run:
    """Run one microbatch through this rank's layers."""
    mb: MicroBatch


@dataclass(frozen=True, slots=True)
class InitKv:
    """Allocate the physical KV cache: one region of `blocks_per_ve` blocks per VE."""
    num_virtual_engines: int
    blocks_per_ve: int


@dataclass(frozen=True, slots=True)
class Reshape:
    """Serve `config`'s split from now on (a live move): a rank whose layers change builds
    them anew, from the checkpoint, with an empty KV cache of the same size; the others keep
    theirs. Sent only while no microbatch is in flight."""
    config: EngineConfig
    blocks_per_ve: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Finish what is queued, release the links and the world, exit."""


ToRank = Run | InitKv | Reshape | Stop


# -- a rank -> the engine ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready:
    """The rank joined the world and loaded its weights."""
    rank: int
    param_bytes: int
    num_blocks: int  # KV blocks this rank can hold (all VEs together)
    placement: RankPlacement | None = None


@dataclass(frozen=True, slots=True)
class KvReady:
    rank: int


@dataclass(frozen=True, slots=True)
class Reshaped:
    """The answer to Reshape: the rank serves the new split (`error` empty, `rebuilt` when its
    layers changed), or could not build its new layers and serves the old ones (`error`)."""
    rank: int
    param_bytes: int
    rebuilt: bool = False
    error: str = ""


@dataclass(frozen=True, slots=True)
class LinkTimes:
    """Wall-clock times (time.time()) around one microbatch's stage link on one rank;
    0.0 where the rank has no such side (no previous stage, no next one)."""
    recv_start: float = 0.0  # began waiting for the previous stage's tensors
    recv_done: float = 0.0  # had them
    send_start: float = 0.0  # began sending its own to the next stage


@dataclass(frozen=True, slots=True)
class Result:
    """One microbatch done on this rank; `output` only from the rank that samples.
    `error`: the microbatch raised here (the rank lives on and stays in step)."""
    rank: int
    mb_id: int
    output: StepOutput | None
    busy_s: float  # this rank's compute seconds since start (waits excluded)
    error: Failure | None = None
    link: LinkTimes | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """The rank raised; it exits after sending this."""
    rank: int
    at: float  # time.monotonic() in the rank's process (system-wide on Linux)
    summary: str  # "ValueError: ..."
    text: str  # the traceback

    @classmethod
    def of(cls, rank: int, exc: BaseException) -> "Failure":
        summary = "".join(traceback.format_exception_only(exc)).strip()
        return cls(rank, time.monotonic(), summary, "".join(traceback.format_exception(exc)))


FromRank = Ready | KvReady | Reshaped | Result | Failure
