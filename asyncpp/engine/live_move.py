"""One live move of the stage split: new stages for the new split start beside the serving
ones (weights from the checkpoint, empty KV caches), then the pipeline pauses, drains, every
running sequence is set to re-prefill, the engine switches to the new stages, and resumes.

Why re-prefill rather than move KV: each stage keeps the KV blocks of its own layers in its
own process, so handing a layer's KV to the neighbour would need a new stage-to-stage
transfer of whole cache regions; and the new stages are built from scratch, so the layers
that do not move have no KV there either. Recompute is the engine's preemption path
(greedy outputs stay the same, tested), costs one prefill of the running sequences, and
needs nothing new between the stages.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import anyio

from asyncpp.core.stages import format_partition
from asyncpp.engine.virtual_engine import VirtualEngine
from asyncpp.executor.executor import Executor
from asyncpp.executor.supervisor import Supervisor

log = logging.getLogger("asyncpp")


@dataclass(slots=True)
class MoveResult:
    moved: bool
    parts: list[float]  # the split serving after it
    build_s: float = 0.0  # starting the new stages, while the old ones served
    pause_s: float = 0.0  # no microbatch sent: drain, preempt, switch
    recomputed: int = 0  # running sequences set to re-prefill
    reason: str = ""  # why it did not happen
    retired: Executor | None = None  # the stages no longer serving: the caller shuts them down


async def move_split(supervisor: Supervisor, ves: Sequence[VirtualEngine], parts: list[float]) -> MoveResult:
    """Serve from `parts` from now on; nothing is lost when it cannot (the stages die meanwhile,
    the new ones fail to start): then the old split goes on serving, or the restart path
    takes over as after any stage death."""
    serving = supervisor.executor
    if serving is None or supervisor.error() is not None:
        return MoveResult(False, list(supervisor.config.layer_partition), reason="the pipeline is not serving")
    config = supervisor.config.with_partition(parts)
    started = time.perf_counter()
    try:
        fresh = await supervisor.prepare(config)
    except Exception as e:
        log.warning("layer move to %s abandoned: the new stages did not start: %s", format_partition(parts), e)
        return MoveResult(False, list(supervisor.config.layer_partition), reason=str(e))
    built = time.perf_counter()
    switched, recomputed = False, 0
    try:
        with anyio.CancelScope(shield=True):  # the VEs must not stay paused
            for ve in ves:
                await ve.pause()
            switched = supervisor.switch(serving, fresh)
            if switched:
                recomputed = sum(ve.recompute_all() for ve in ves)
    finally:
        for ve in ves:
            ve.resume()
    paused = time.perf_counter() - built
    if not switched:
        return MoveResult(False, list(supervisor.config.layer_partition), built - started,
                          reason="a stage failed, or the engine began to shut down, during the move", retired=fresh)
    log.info("layer split moved to %s: new stages built in %.2f s beside the old, pipeline paused %.1f ms, "
             "%d running sequence(s) re-prefill", format_partition(parts), built - started, paused * 1e3, recomputed)
    return MoveResult(True, list(parts), built - started, paused, recomputed, retired=serving)
