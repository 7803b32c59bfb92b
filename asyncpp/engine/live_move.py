"""One live move of the stage split: the pipeline pauses and drains, the ranks whose layers
change build them anew in their own processes (weights from the checkpoint, an empty KV
cache of the same size; the other ranks keep theirs), every running sequence is set to
re-prefill, and the engine resumes on the same stages.

Why re-prefill rather than move KV: each stage keeps the KV blocks of its own layers in its
own process, and a moved attention half's KV would have to cross to the neighbour as whole
cache regions, a transfer the stage links do not have. Recompute is the engine's preemption
path (greedy outputs stay the same, tested), costs one prefill of the running sequences,
and needs nothing new between the stages.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import anyio

from asyncpp.core.stages import format_partition
from asyncpp.engine.virtual_engine import VirtualEngine
from asyncpp.executor.supervisor import Supervisor

log = logging.getLogger("asyncpp")


@dataclass(slots=True)
class MoveResult:
    moved: bool
    parts: list[float]  # the split serving after it
    pause_s: float = 0.0  # no microbatch sent: drain, rebuild the changed stages, preempt
    rebuilt: int = 0  # ranks that built new layers
    recomputed: int = 0  # running sequences set to re-prefill
    reason: str = ""  # why it did not happen


async def move_split(supervisor: Supervisor, ves: Sequence[VirtualEngine], parts: list[float]) -> MoveResult:
    """Serve from `parts` from now on; nothing is lost when it cannot (a stage fails to build
    its new layers: the old split serves on; a stage dies meanwhile: the restart path takes
    over as after any stage death)."""
    old = list(supervisor.config.layer_partition)
    if supervisor.executor is None or supervisor.error() is not None:
        return MoveResult(False, old, reason="the pipeline is not serving")
    config = supervisor.config.with_partition(parts)
    started = time.perf_counter()
    rebuilt, recomputed, reason = 0, 0, ""
    try:
        with anyio.CancelScope(shield=True):  # the VEs must not stay paused
            for ve in ves:
                await ve.pause()
            try:
                rebuilt = await supervisor.reshape(config)
            except Exception as e:
                reason = str(e) or type(e).__name__
            # Even a failed move may have rebuilt a rank (and gone back): its KV is gone.
            recomputed = sum(ve.recompute_all() for ve in ves)
    finally:
        for ve in ves:
            ve.resume()
    paused = time.perf_counter() - started
    if reason:
        log.warning("layer move to %s abandoned after %.1f ms: %s", format_partition(parts), paused * 1e3, reason)
        return MoveResult(False, old, paused, recomputed=recomputed, reason=reason)
    log.info("layer split moved to %s: %d rank(s) built their new layers, pipeline paused %.1f ms, %d running "
             "sequence(s) re-prefill", format_partition(parts), rebuilt, paused * 1e3, recomputed)
    return MoveResult(True, list(parts), paused, rebuilt, recomputed)
