"""Where each rank runs: its node and how the previous stage's tensors reach it."""
from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Node:
    """A machine of the engine: Ray's node id (the host name outside Ray) and its address."""
    node_id: str
    ip: str

    @classmethod
    def local(cls) -> "Node":
        return cls(socket.gethostname(), "127.0.0.1")

    def __str__(self) -> str:
        return f"{self.ip} (node {self.node_id[:12]})"


@dataclass(frozen=True, slots=True)
class RankPlacement:
    """Reported by each rank when it is ready (`AsyncLLM.placement()`)."""
    rank: int
    stage: int
    tp_rank: int
    node: Node
    link_in: str  # how the previous stage's tensors arrive: "shm" | "gloo" | "nccl"; "" on the first stage
    interface: str  # the network interface its collectives are bound to ("" when left to the library)
