"""Stage-to-stage tensors, point to point: from a stage's rank to the next stage's rank at
the same tp position. Through a shared-memory ring (asyncpp.worker.shm_channel) between
CPU processes of one machine (the same node), else gloo on CPU, NCCL on GPUs. Every stage handles
microbatches in submission order, so the n-th message between two ranks always belongs to
the n-th microbatch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from asyncpp.core.microbatch import IntermediateTensors, TensorSpec
from asyncpp.core.stages import StageSpec
from asyncpp.worker.shm_channel import RingRegion, ShmReceiver, ShmSender
from asyncpp.worker.shm_common import supported as shm_supported
from asyncpp.worker.shm_common import unlink_quietly


@dataclass(slots=True)
class StageLink:
    """This rank's point-to-point links: from the previous stage, to the next one. Each
    goes through a shared-memory ring when set (see connect_stage_links), else through
    the world's library."""
    stage: StageSpec
    device: torch.device
    from_prev: ShmReceiver | None = None
    to_next: ShmSender | None = None
    _pending_sends: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list)

    @property
    def kind_in(self) -> str:
        """How tensors from the previous stage arrive: "shm", "gloo" or "nccl" ("" on the first stage)."""
        if self.stage.is_first:
            return ""
        if self.from_prev is not None:
            return "shm"
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def prev_rank(self) -> int:
        return (self.stage.pp_rank - 1) * self.stage.tp_size + self.stage.tp_rank

    @property
    def next_rank(self) -> int:
        return (self.stage.pp_rank + 1) * self.stage.tp_size + self.stage.tp_rank

    def recv(self, spec: TensorSpec) -> IntermediateTensors:
        """Receive one microbatch's tensors from the previous stage (blocks)."""
        tensors = {name: torch.empty(shape, dtype=dtype, device=self.device)
                   for name, (shape, dtype) in sorted(spec.items())}
        if self.from_prev is not None:
            self.from_prev.recv_into(list(tensors.values()))
            return tensors
        works = [dist.irecv(t, src=self.prev_rank, tag=i) for i, t in enumerate(tensors.values())]
        for w in works:
            w.wait()
        return tensors

    def send(self, tensors: IntermediateTensors) -> None:
        """Send to the next stage. Shared memory: copied before returning. Library: started,
        and the previous send must finish first, so at most one microbatch's tensors are
        held alive by in-flight sends."""
        ordered = [t for _, t in sorted(tensors.items())]
        if self.to_next is not None:
            self.to_next.send(ordered)
            return
        self.wait_sends()
        for i, t in enumerate(ordered):
            t = t.contiguous()
            self._pending_sends.append((dist.isend(t, dst=self.next_rank, tag=i), t))

    def wait_sends(self) -> None:
        for work, _ in self._pending_sends:
            work.wait()
        self._pending_sends.clear()

    def close(self) -> None:
        self.wait_sends()
        for end in (self.from_prev, self.to_next):
            if end is not None:
                end.close()
        self.from_prev = self.to_next = None


def connect_stage_links(stage: StageSpec, device: torch.device, message_bytes: int, num_slots: int,
                        choice: str, node: str = "", max_slot_bytes: int = 64 << 20,
                        timeout_s: float = 600.0) -> StageLink:
    """Collective over the world (every rank calls it): this rank's StageLink, with a
    shared-memory ring to each neighbour that is a CPU process of this machine (unless
    `choice`, EngineConfig.pp_comm, is gloo). `node` names this rank's machine: a ring is
    offered only to a neighbour on the same node, since two hosts may share a file system
    (containers, network namespaces) and still be different machines. `message_bytes`: one
    microbatch's tensors at the most tokens; `num_slots`: more than the microbatches in flight,
    so a sender never waits."""
    link = StageLink(stage, device)
    if stage.pp_size == 1:
        return link
    if device.type != "cpu":  # the same on every rank: no collective to match
        if choice == "shm":
            raise RuntimeError("--pp-comm shm: stage-to-stage shared memory needs CPU devices")
        return link
    want = choice != "gloo" and shm_supported()
    slot_bytes = max(1, min(message_bytes, max_slot_bytes))
    region = _create_ring(num_slots, slot_bytes) if want and not stage.is_last else None
    offers: list = [None] * dist.get_world_size()  # (path, token) of each rank's ring to its next stage
    dist.all_gather_object(offers, (region.path, region.token, node) if region else None)
    offer = offers[link.prev_rank] if not stage.is_first else None
    offer = offer if offer is not None and offer[2] == node else None
    mapped = _attach_ring(offer, num_slots, slot_bytes) if want and offer else None
    accepted: list = [None] * dist.get_world_size()
    dist.all_gather_object(accepted, mapped is not None)
    if region is not None:
        unlink_quietly(region.path)  # every rank has mapped it (or given up): nothing left to leak
        if accepted[link.next_rank]:
            link.to_next = ShmSender(region, f"stage rank {link.next_rank} (receiver)", timeout_s)
        else:
            region.close()
    if mapped is not None:
        link.from_prev = ShmReceiver(mapped, f"stage rank {link.prev_rank} (sender)", timeout_s)
    missing = (not stage.is_first and link.from_prev is None) or (not stage.is_last and link.to_next is None)
    if choice == "shm" and missing:
        raise RuntimeError("--pp-comm shm: adjacent stages could not share memory "
                           "(they need CPU devices, x86-64 and one machine: the same Ray node)")
    return link


def _create_ring(num_slots: int, slot_bytes: int) -> RingRegion | None:
    try:
        return RingRegion.create(num_slots, slot_bytes)
    except OSError:  # no room in /dev/shm: this link stays on the library
        return None


def _attach_ring(offer: tuple[str, bytes, str], num_slots: int, slot_bytes: int) -> RingRegion | None:
    """The previous stage's ring, or None when this rank cannot see that very file."""
    path, token, _ = offer
    try:
        region = RingRegion.attach(path, num_slots, slot_bytes)
    except (OSError, ValueError):  # not there: another machine or IPC namespace
        return None
    if region.token != token:  # another machine's file under the same name
        region.close()
        return None
    return region
