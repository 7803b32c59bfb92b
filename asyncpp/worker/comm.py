"""torch.distributed for stage ranks: world setup, stage-to-stage tensors, the TP group.

One world of P*T ranks, rank = pp_rank * T + tp_rank. Intermediate tensors go from a
stage's rank to the next stage's rank at the same tp position, point to point: through
a shared-memory ring (asyncpp.worker.shm_channel) between CPU processes of one machine,
else gloo on CPU, NCCL on GPUs. Every stage handles microbatches in submission order, so
the n-th message between two ranks always belongs to the n-th microbatch. The T ranks of a
stage all-reduce through shared memory when they are CPU processes of one machine
(benchmarks/tp_allreduce.py: 5-40x faster than gloo here), else through NCCL or gloo.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from asyncpp.core.stages import StageSpec
from asyncpp.core.microbatch import IntermediateTensors
from asyncpp.worker.shm_channel import RingRegion, ShmReceiver, ShmSender
from asyncpp.worker.shm_collectives import DEFAULT_SLOT_BYTES, SharedRegion, ShmCollectives
from asyncpp.worker.shm_common import supported as shm_supported
from asyncpp.worker.shm_common import unlink_quietly

TensorSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_init_method() -> str:
    return f"tcp://127.0.0.1:{free_tcp_port()}"


def init_world(rank: int, world_size: int, init_method: str, device: str,
               timeout_s: float = 600.0) -> torch.device:
    """Join the world; returns the device this rank computes on."""
    if device == "cuda":
        local = rank % torch.cuda.device_count()
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), device_id=dev)
        return dev
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return torch.device("cpu")


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(slots=True)
class TPGroup:
    """The ranks of one stage, for tensor-parallel collectives (asyncpp.model.parallel.TPGroup).

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


def _transport_choice(variable: str) -> str:
    value = os.environ.get(variable, "auto").lower()
    if value not in ("auto", "shm", "gloo"):
        raise ValueError(f"{variable} must be auto, shm or gloo, got {value!r}")
    return value


def tp_transport() -> str:
    """ASYNCPP_TP_COMM: auto (shared memory between CPU ranks of one machine, else the
    world's library) | shm (insist) | gloo (always the world's library: gloo, NCCL on GPUs)."""
    return _transport_choice("ASYNCPP_TP_COMM")


def pp_transport() -> str:
    """ASYNCPP_PP_COMM, for stage-to-stage tensors: the same choices as ASYNCPP_TP_COMM."""
    return _transport_choice("ASYNCPP_PP_COMM")


def make_tp_groups(pp_size: int, tp_size: int, my_rank: int) -> TPGroup:
    """Every rank must call this: new_group is collective over the whole world."""
    mine = None
    for pp in range(pp_size):
        ranks = [pp * tp_size + t for t in range(tp_size)]
        group = dist.new_group(ranks) if tp_size > 1 else None
        if my_rank in ranks:
            mine = TPGroup(ranks, ranks.index(my_rank), group)
    assert mine is not None
    transport = tp_transport()
    if mine.size > 1 and transport != "gloo" and dist.get_backend() == "gloo" and shm_supported():
        mine.shm = open_shared_memory(mine)
    if transport == "shm" and mine.size > 1 and mine.shm is None:
        raise RuntimeError("ASYNCPP_TP_COMM=shm: the ranks of a TP group could not share memory "
                           "(they need CPU devices, x86-64 and one machine)")
    return mine


def open_shared_memory(tp: TPGroup, slot_bytes: int = DEFAULT_SLOT_BYTES) -> ShmCollectives | None:
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
    def prev_rank(self) -> int:
        return (self.stage.pp_rank - 1) * self.stage.tp_size + self.stage.tp_rank

    @property
    def next_rank(self) -> int:
        return (self.stage.pp_rank + 1) * self.stage.tp_size + self.stage.tp_rank

    def transports(self) -> tuple[str | None, str | None]:
        """(from the previous stage, to the next one): "shm", the library's name, or None."""
        library = dist.get_backend() if dist.is_initialized() else None
        prev = None if self.stage.is_first else ("shm" if self.from_prev else library)
        nxt = None if self.stage.is_last else ("shm" if self.to_next else library)
        return prev, nxt

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
                        max_slot_bytes: int = 64 << 20, timeout_s: float = 600.0) -> StageLink:
    """Collective over the world (every rank calls it): this rank's StageLink, with a
    shared-memory ring to each neighbour that is a CPU process of this machine (unless
    ASYNCPP_PP_COMM=gloo). `message_bytes`: one microbatch's tensors at the most tokens;
    `num_slots`: more than the microbatches in flight, so a sender never waits."""
    link = StageLink(stage, device)
    choice = pp_transport()
    if stage.pp_size == 1:
        return link
    if device.type != "cpu":  # the same on every rank: no collective to match
        if choice == "shm":
            raise RuntimeError("ASYNCPP_PP_COMM=shm: stage-to-stage shared memory needs CPU devices")
        return link
    want = choice != "gloo" and shm_supported()
    slot_bytes = max(1, min(message_bytes, max_slot_bytes))
    region = _create_ring(num_slots, slot_bytes) if want and not stage.is_last else None
    offers: list = [None] * dist.get_world_size()  # (path, token) of each rank's ring to its next stage
    dist.all_gather_object(offers, (region.path, region.token) if region else None)
    offer = offers[link.prev_rank] if not stage.is_first else None
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
        raise RuntimeError("ASYNCPP_PP_COMM=shm: adjacent stages could not share memory "
                           "(they need CPU devices, x86-64 and one machine)")
    return link


def _create_ring(num_slots: int, slot_bytes: int) -> RingRegion | None:
    try:
        return RingRegion.create(num_slots, slot_bytes)
    except OSError:  # no room in /dev/shm: this link stays on the library
        return None


def _attach_ring(offer: tuple[str, bytes], num_slots: int, slot_bytes: int) -> RingRegion | None:
    """The previous stage's ring, or None when this rank cannot see that very file."""
    path, token = offer
    try:
        region = RingRegion.attach(path, num_slots, slot_bytes)
    except (OSError, ValueError):  # not there: another machine or IPC namespace
        return None
    if region.token != token:  # another machine's file under the same name
        region.close()
        return None
    return region
