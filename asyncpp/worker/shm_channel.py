"""A one-way channel for stage-to-stage tensors between two CPU processes of one machine,
through a shared-memory ring of slots instead of gloo's sockets (whose I/O threads wait
for a core when every core computes).

Message n uses slot n % num_slots. The sender waits until the receiver has released that
slot, copies the bytes in, then publishes n + 1 in `sent`; the receiver waits for `sent`
to pass n, copies the bytes out, then publishes n + 1 in `released`. Both counters live
on their own cache line, each written by one side only. A message larger than a slot
goes through consecutive slots, so any size works; both sides know the shapes, so the
bytes carry no header. Ordering: see asyncpp.worker.shm_common.
"""
from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from asyncpp.worker.shm_common import CACHE_LINE, attach_mapping, create_mapping, read_token, wait_until, write_token

_HEADER = 3 * CACHE_LINE  # token, sent, released
_SENT, _RELEASED = CACHE_LINE // 8, 2 * CACHE_LINE // 8  # int64 indices


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(slots=True)
class RingRegion:
    """The mapped ring: a token proving which file it is, the two counters, the slots."""
    path: str
    num_slots: int
    slot_bytes: int
    buffer: mmap.mmap
    counters: np.ndarray = field(init=False)  # int64 view of the header
    token: bytes = field(init=False)
    slots: torch.Tensor = field(init=False)  # uint8 [num_slots, slot_bytes]

    def __post_init__(self) -> None:
        self.counters = np.frombuffer(self.buffer, dtype=np.int64, count=_HEADER // 8)
        self.token = read_token(self.buffer, 0)
        raw = torch.frombuffer(self.buffer, dtype=torch.uint8, offset=_HEADER,
                               count=self.num_slots * self.slot_bytes)
        self.slots = raw.view(self.num_slots, self.slot_bytes)

    @staticmethod
    def total_bytes(num_slots: int, slot_bytes: int) -> int:
        return _HEADER + num_slots * slot_bytes

    @classmethod
    def create(cls, num_slots: int, slot_bytes: int) -> "RingRegion":
        slot_bytes = _round_up(slot_bytes, CACHE_LINE)
        path, buffer = create_mapping("pp", cls.total_bytes(num_slots, slot_bytes))  # counters start at 0
        write_token(buffer, 0)
        return cls(path, num_slots, slot_bytes, buffer)

    @classmethod
    def attach(cls, path: str, num_slots: int, slot_bytes: int) -> "RingRegion":
        slot_bytes = _round_up(slot_bytes, CACHE_LINE)
        return cls(path, num_slots, slot_bytes, attach_mapping(path, cls.total_bytes(num_slots, slot_bytes)))

    def close(self) -> None:
        """Drop this process's views, then the mapping (the file is unlinked once mapped)."""
        del self.counters, self.slots
        try:
            self.buffer.close()
        except BufferError:  # a view is still alive somewhere: the collector unmaps it later
            pass


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _stream(views: list[torch.Tensor], take_slot: Callable[[], torch.Tensor], finish_slot: Callable[[], None],
            into_ring: bool) -> None:
    """Walk the byte views and the ring's slots side by side, copying into the ring (sender)
    or out of it (receiver); a slot is finished when full and after the last byte."""
    slot, used = None, 0
    for view in views:
        done = 0
        while done < view.numel():
            if slot is None:
                slot, used = take_slot(), 0
            n = min(view.numel() - done, slot.numel() - used)
            ring, mine = slot[used: used + n], view[done: done + n]
            (ring.copy_(mine) if into_ring else mine.copy_(ring))
            done, used = done + n, used + n
            if used == slot.numel():
                finish_slot()
                slot = None
    if slot is not None:
        finish_slot()


class _End:
    def __init__(self, region: RingRegion, peer: str, timeout_s: float):
        self.region, self.peer, self.timeout_s = region, peer, timeout_s
        self._next = 0  # slot-sized pieces handed over so far (this end's count)

    def close(self) -> None:
        self.region.close()


class ShmSender(_End):
    def send(self, tensors: list[torch.Tensor]) -> None:
        """Copy the tensors' bytes, in order, into the ring (blocks only while it is full)."""
        _stream([_as_bytes(t) for t in tensors], self._acquire, self._publish, into_ring=True)

    def _acquire(self) -> torch.Tensor:
        counters, piece, slots = self.region.counters, self._next, self.region.num_slots
        if counters[_RELEASED] <= piece - slots:
            wait_until(lambda: counters[_RELEASED] > piece - slots, self.timeout_s,
                       what=lambda: f"{self.peer} did not free a slot for piece {piece}")
        return self.region.slots[piece % slots]

    def _publish(self) -> None:
        self._next += 1
        self.region.counters[_SENT] = self._next


class ShmReceiver(_End):
    def recv_into(self, tensors: list[torch.Tensor]) -> None:
        """Fill the (contiguous) tensors, in order, with the sender's bytes."""
        _stream([t.view(-1).view(torch.uint8) for t in tensors], self._await, self._release, into_ring=False)

    def _await(self) -> torch.Tensor:
        counters, piece = self.region.counters, self._next
        if counters[_SENT] <= piece:
            wait_until(lambda: counters[_SENT] > piece, self.timeout_s,
                       what=lambda: f"{self.peer} sent nothing for piece {piece}")
        return self.region.slots[piece % self.region.num_slots]

    def _release(self) -> None:
        self._next += 1
        self.region.counters[_RELEASED] = self._next
