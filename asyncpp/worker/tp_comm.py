"""Tensor-parallel collectives between the T ranks of one stage.

CPU ranks of one machine all-reduce through shared memory (asyncpp.worker.shm_collectives;
measured against gloo in benchmarks/tp_allreduce.py); elsewhere through the world's
library (NCCL, gloo).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from asyncpp.worker.shm_collectives import DEFAULT_SLOT_BYTES, SharedRegion, ShmCollectives
from asyncpp.worker.shm_common import supported as shm_supported
from asyncpp.worker.shm_common import unlink_quietly


@dataclass(slots=True)
class TPCommunicator:
    """The ranks of one stage, for tensor-parallel collectives: what the model's layers
    see as their `asyncpp.model.parallel.TPGroup`.

    On CPU ranks of one machine the collectives go through shared memory
    (asyncpp.worker.shm_collectives); elsewhere through the world's library (NCCL, gloo).
    `comm_s` counts the seconds spent inside collectives, waits for slower peers included.
    """
    ranks: list[int]  # global ranks, in tp order
    rank: int  # this rank's position in the group
    group: dist.ProcessGroup | None
    shm: ShmCollectives | None = None
    comm_s: float = 0.0
    calls: int = 0

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def transport(self) -> str:
        if self.size == 1:
            return "none"
        return "shm" if self.shm is not None else dist.get_backend(self.group)

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.size == 1:
            return
        started = time.perf_counter()
        if self.shm is not None:
            self.shm.all_reduce(t)
        else:
            dist.all_reduce(t, group=self.group)
        self._count(started)

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return t
        started = time.perf_counter()
        if self.shm is not None:
            out = self.shm.all_gather(t, dim)
        else:
            parts = [torch.empty_like(t) for _ in range(self.size)]
            dist.all_gather(parts, t.contiguous(), group=self.group)
            out = torch.cat(parts, dim=dim)
        self._count(started)
        return out

    def _count(self, started: float) -> None:
        self.comm_s += time.perf_counter() - started
        self.calls += 1


def make_tp_communicator(pp_size: int, tp_size: int, my_rank: int, choice: str) -> TPCommunicator:
    """Every rank must call this: new_group is collective over the whole world.
    `choice` (EngineConfig.tp_comm): auto (shared memory between CPU ranks of one machine,
    else the world's library) | shm (insist) | gloo (always the world's library)."""
    mine = None
    for pp in range(pp_size):
        ranks = [pp * tp_size + t for t in range(tp_size)]
        group = dist.new_group(ranks) if tp_size > 1 else None
        if my_rank in ranks:
            mine = TPCommunicator(ranks, ranks.index(my_rank), group)
    assert mine is not None
    if mine.size > 1 and choice != "gloo" and dist.get_backend() == "gloo" and shm_supported():
        mine.shm = open_shared_memory(mine)
    if choice == "shm" and mine.size > 1 and mine.shm is None:
        raise RuntimeError("--tp-comm shm: the ranks of a TP group could not share memory "
                           "(they need CPU devices, x86-64 and one machine)")
    return mine


def open_shared_memory(tp: TPCommunicator, slot_bytes: int = DEFAULT_SLOT_BYTES) -> ShmCollectives | None:
    """Collective over the TP group: map one shared file on every rank, or None on every
    rank when one of them cannot see it (another machine, another IPC namespace)."""
    region, ok = None, False
    meta: list = [None, None]
    if tp.rank == 0:
        region = SharedRegion.create(tp.size, slot_bytes)
        meta = [region.path, region.token]
    dist.broadcast_object_list(meta, src=tp.ranks[0], group=tp.group)
    try:
        region = region or SharedRegion.attach(meta[0], tp.size, slot_bytes)
        ok = region.token == meta[1]
    except (OSError, ValueError):  # not there, or not the same file
        ok = False
    seen: list = [None] * tp.size
    dist.all_gather_object(seen, ok, group=tp.group)
    if tp.rank == 0:
        unlink_quietly(meta[0])  # every rank has mapped it (or given up): nothing left to leak
    if not all(seen):
        return None
    return ShmCollectives(region, tp.rank)
