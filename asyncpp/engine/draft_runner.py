"""The draft model, run in the engine process: asyncpp's own model code (one ModelRunner holding
every layer) with a KV region per virtual engine.

Placement: the VEs drive it from the event loop, its forwards run in a worker thread (so the
other VEs keep scheduling and streaming meanwhile), one forward at a time (one model, one set
of torch threads). Its threads, those of one rank: when it may run while stages work (more than
one microbatch in flight, all VEs together), the engine counts it as one more rank when it
divides the cores (engine_args), so the draft and the stages do not oversubscribe the machine;
with one VE and one microbatch in flight (P = 1, V = 1) draft and stage take turns, and share them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio
import torch

from asyncpp.core.config import EngineConfig
from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine.draft_config import draft_engine_config
from asyncpp.worker.model_runner import ModelRunner

log = logging.getLogger("asyncpp")

# Only "a token is sampled here" is read: the draft takes the argmax of its logits itself.
_GREEDY = SampleSpec(SamplingParams(temperature=0), None, 0)


@dataclass(slots=True)
class DraftJob:
    """One sequence's draft: catch up on `tokens` (those the draft has not computed, ending with
    the sequence's last) from position `start`, then `k` greedy steps."""
    tokens: list[int]
    start: int
    block_table: list[int]
    k: int

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


class DraftRunner:
    def __init__(self, config: EngineConfig):
        """Builds the draft and loads its weights (blocking: call it off the event loop)."""
        self.config = config
        self.threads = config.threads_per_rank
        torch.set_num_threads(self.threads)
        self.runner = ModelRunner(config, config.stages[0])
        self._limiter: anyio.CapacityLimiter | None = None

    @classmethod
    def for_target(cls, target: EngineConfig) -> DraftRunner:
        return cls(draft_engine_config(target))

    def blocks_per_ve(self, target_blocks_per_ve: int) -> int:
        """As many blocks per VE as the target's (the draft holds no more tokens of a sequence than
        the target does), but no more than its running sequences can fill."""
        config = self.config
        return min(target_blocks_per_ve, config.max_num_seqs * -(-config.max_model_len // config.block_size))

    def init_kv_cache(self, num_virtual_engines: int, blocks_per_ve: int) -> None:
        self.runner.init_kv_cache(num_virtual_engines, blocks_per_ve)
        total = num_virtual_engines * blocks_per_ve * self.config.kv_bytes_per_block()
        shape = self.config.shape
        log.info("speculative decoding: draft model %s (%d layers, vocabulary %d) in the engine process, "
                 "%d torch thread(s), forwards in a worker thread; its KV cache %.1f MiB", self.config.model_path,
                 shape.num_layers, shape.vocab_size, self.threads, total / 2**20)

    async def propose(self, ve_id: int, jobs: list[DraftJob]) -> tuple[list[list[int]], float]:
        """Each job's greedy tokens (its k of them), from a worker thread, and the seconds the
        draft computed (not counting the wait for another VE's draft)."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(self._timed, ve_id, jobs, limiter=self._limiter)

    def _timed(self, ve_id: int, jobs: list[DraftJob]) -> tuple[list[list[int]], float]:
        started = time.perf_counter()
        drafted = self._greedy(ve_id, jobs)
        return drafted, time.perf_counter() - started

    def _greedy(self, ve_id: int, jobs: list[DraftJob]) -> list[list[int]]:
        torch.set_num_threads(self.threads)  # per calling thread
        works = [SeqWork(i, job.tokens, job.start, job.block_table, _GREEDY) for i, job in enumerate(jobs)]
        drafted: list[list[int]] = [[] for _ in jobs]
        active = list(range(len(jobs)))
        step = 0
        while active:
            logits = self.runner.forward(MicroBatch(ve_id, [works[i] for i in active]), None)
            assert isinstance(logits, torch.Tensor)
            for i, token in zip(active, logits.argmax(dim=-1).tolist()):
                drafted[i].append(token)
            active = [i for i in active if len(drafted[i]) < jobs[i].k]
            for i in active:  # the token just drafted, at the position after the last computed
                works[i] = SeqWork(i, [drafted[i][-1]], jobs[i].end + step, jobs[i].block_table, _GREEDY)
            step += 1
        return drafted
