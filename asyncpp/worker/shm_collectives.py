"""All-reduce and all-gather for the CPU ranks of one TP group on one machine, through a
shared-memory file instead of gloo's sockets (how much faster: benchmarks/RESULTS.md,
"CPU all-reduce: shared memory vs gloo").

Each rank owns one slot per phase: it copies its tensor in, publishes the step number in
its arrival flag, waits until every peer's flag has reached that step, then reads every
slot. Two phases alternate, so a slot is rewritten only after every peer has announced
the next step, that is, after every peer has finished reading it: one wait per step.
Every rank sums the slots in rank order with the same kernel, so all of them end with
bit-identical results (greedy parity across ranks depends on it).

Ordering relies on x86-64's total store order (asyncpp.worker.shm_common); other
architectures use gloo instead.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field

import numpy as np
import torch

from asyncpp.worker.shm_common import (
    CACHE_LINE,
    attach_mapping,
    create_mapping,
    read_token,
    remove_stale_regions,
    supported,
    unlink_quietly,
    wait_until,
    write_token,
)

__all__ = ["DEFAULT_SLOT_BYTES", "SharedRegion", "ShmCollectives", "remove_stale_regions", "supported",
           "unlink_quietly"]

_FLAG_STRIDE = CACHE_LINE // 8
_PHASES = 2
DEFAULT_SLOT_BYTES = 8 << 20  # larger tensors go through in pieces of this size


@dataclass(slots=True)
class SharedRegion:
    """The mapped file: arrival flags, a token proving which file it is, then the slots."""
    path: str
    size: int  # ranks
    slot_bytes: int
    buffer: mmap.mmap
    flags: np.ndarray = field(init=False)  # int64 [size], strided by a cache line
    token: bytes = field(init=False)
    data: torch.Tensor = field(init=False)  # uint8 [phases, size, slot_bytes]

    def __post_init__(self) -> None:
        head = self.header_bytes(self.size)
        self.flags = np.frombuffer(self.buffer, dtype=np.int64, count=self.size * _FLAG_STRIDE)[::_FLAG_STRIDE]
        self.token = read_token(self.buffer, head - CACHE_LINE)
        raw = torch.frombuffer(self.buffer, dtype=torch.uint8, offset=head,
                               count=_PHASES * self.size * self.slot_bytes)
        self.data = raw.view(_PHASES, self.size, self.slot_bytes)

    @staticmethod
    def header_bytes(size: int) -> int:
        return size * CACHE_LINE + CACHE_LINE

    @classmethod
    def total_bytes(cls, size: int, slot_bytes: int) -> int:
        return cls.header_bytes(size) + _PHASES * size * slot_bytes

    @classmethod
    def create(cls, size: int, slot_bytes: int) -> "SharedRegion":
        path, buffer = create_mapping("tp", cls.total_bytes(size, slot_bytes))  # zero-filled: steps start at 0
        write_token(buffer, cls.header_bytes(size) - CACHE_LINE)
        return cls(path, size, slot_bytes, buffer)

    @classmethod
    def attach(cls, path: str, size: int, slot_bytes: int) -> "SharedRegion":
        return cls(path, size, slot_bytes, attach_mapping(path, cls.total_bytes(size, slot_bytes)))


class ShmCollectives:
    """One rank's end of a shared region. Every rank must call the same collectives in the
    same order with tensors of the same shape and dtype (as any collective library)."""

    def __init__(self, region: SharedRegion, rank: int, timeout_s: float = 600.0):
        assert region.size >= 2, "one rank needs no collectives"
        self.region, self.rank, self.size = region, rank, region.size
        self.timeout_s = timeout_s
        self._peers = [r for r in range(self.size) if r != rank]
        self._step = 0
        self._views: dict[torch.dtype, torch.Tensor] = {}

    def _slots(self, dtype: torch.dtype) -> torch.Tensor:
        """[phases, size, slot elements] of `dtype` over the shared bytes."""
        if dtype not in self._views:
            self._views[dtype] = self.region.data.view(dtype)
        return self._views[dtype]

    def _publish(self, chunk: torch.Tensor) -> torch.Tensor:
        """Copy this rank's piece in, announce it, wait for every peer's; their slots."""
        self._step += 1
        slots = self._slots(chunk.dtype)[self._step % _PHASES, :, : chunk.numel()]
        slots[self.rank].copy_(chunk)
        self.region.flags[self.rank] = self._step
        self._wait_for_peers()
        return slots

    def _wait_for_peers(self) -> None:
        flags, step = self.region.flags, self._step
        for peer in self._peers:
            if flags[peer] < step:  # peers of one collective arrive close together: never nap
                wait_until(lambda: flags[peer] >= step, self.timeout_s, max_nap_s=None,
                           what=lambda: f"tensor-parallel peer {peer} did not reach collective step {step}")

    def _pieces(self, flat: torch.Tensor) -> list[torch.Tensor]:
        per = self.region.slot_bytes // flat.element_size()
        return list(flat.split(per)) if flat.numel() > per else [flat]

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum in place; slot 0 + slot 1 + ... on every rank, so results are identical."""
        in_place = t.is_contiguous()
        flat = t.view(-1) if in_place else t.contiguous().view(-1)
        for piece in self._pieces(flat):
            slots = self._publish(piece)
            torch.add(slots[0], slots[1], out=piece)
            for r in range(2, self.size):
                piece.add_(slots[r])
        if not in_place:
            t.copy_(flat.view_as(t))

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        flat = t.contiguous().view(-1)
        out = torch.empty(self.size, flat.numel(), dtype=t.dtype)
        start = 0
        for piece in self._pieces(flat):
            slots = self._publish(piece)
            out[:, start: start + piece.numel()].copy_(slots)
            start += piece.numel()
        parts = out.view(self.size, *t.shape)
        return torch.cat(parts.unbind(0), dim=dim)
