"""Which virtual engine each request runs on: chosen when it arrives, kept until it finishes."""
from __future__ import annotations

from asyncpp.core.config import EngineConfig
from asyncpp.engine.scheduler import SOLO_DECODES
from asyncpp.engine.sequence import Sequence
from asyncpp.engine.virtual_engine import VirtualEngine


class Router:
    """Routes requests across the VEs, and is the VEs' owner (`VirtualEngineOwner`): they
    report here when a request is done, and ask whether another VE has decoding streams."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.ves: list[VirtualEngine] = []  # filled once the VEs exist (they are built with their owner)
        self._where: dict[str, VirtualEngine] = {}
        self._pack = config.solo_threads > 0 and config.num_virtual_engines > 1

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._where

    def __len__(self) -> int:
        """Requests running or waiting."""
        return len(self._where)

    def route(self, request_id: str, seq: Sequence) -> VirtualEngine:
        """The VE holding the longest cached prefix of the prompt, among those not
        overloaded: at most `slack` more unfinished sequences than the least loaded one
        (so a popular prefix spreads once a VE is busy, and then is cached in each).
        Least loaded first among equals, and when nothing is cached. Under a light load on
        one CPU host (EngineConfig.solo_threads), the busiest VE instead (see _choose)."""
        ve = self._choose(seq)
        self._where[request_id] = ve
        return ve

    def _choose(self, seq: Sequence) -> VirtualEngine:
        if self._pack and self.num_unfinished_seqs() < SOLO_DECODES:
            # Few requests run faster together in one microbatch, alone in the pipeline with
            # every core per stage, than spread over VEs whose microbatches overlap.
            busy = [ve for ve in self.ves if ve.num_unfinished_seqs] or self.ves
            cached = self._cached_blocks(busy, seq)
            return max(busy, key=lambda ve: (cached[ve.ve_id], ve.num_unfinished_seqs))
        least = min(ve.num_unfinished_seqs for ve in self.ves)
        candidates = [ve for ve in self.ves if ve.num_unfinished_seqs <= least + self.slack]
        cached = self._cached_blocks(candidates, seq)
        return max(candidates, key=lambda ve: (cached[ve.ve_id], -ve.num_unfinished_seqs))

    def _cached_blocks(self, ves: list[VirtualEngine], seq: Sequence) -> dict[int, int]:
        """Blocks of seq's prompt each VE holds cached (all 0 without cache-aware routing)."""
        if len(ves) == 1 or not (self.config.enable_prefix_caching and self.config.cache_aware_routing):
            return {ve.ve_id: 0 for ve in ves}
        keys = ves[0].blocks.keys(seq, (seq.num_tokens - 1) // self.config.block_size)
        return {ve.ve_id: len(ve.blocks.match(keys)) for ve in ves}

    @property
    def slack(self) -> int:
        return max(1, self.config.max_num_seqs // 4)

    def take(self, request_id: str) -> VirtualEngine | None:
        """The request's VE, forgetting it (the caller aborts it there)."""
        return self._where.pop(request_id, None)

    # -- VirtualEngineOwner ------------------------------------------------------
    def request_done(self, request_id: str) -> None:
        self._where.pop(request_id, None)

    def decoding_besides(self, ve_id: int) -> bool:
        return any(ve.scheduler.num_decoding for ve in self.ves if ve.ve_id != ve_id)

    def num_running_seqs(self) -> int:
        return sum(len(ve.scheduler.running) for ve in self.ves)

    def num_unfinished_seqs(self) -> int:
        return sum(ve.num_unfinished_seqs for ve in self.ves)
