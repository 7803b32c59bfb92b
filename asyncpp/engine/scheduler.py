"""Continuous batching for one virtual engine: chunked prefill, FCFS, preemption by recompute."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from asyncpp.engine.block_manager import BlockManager
from asyncpp.engine.sequence import SeqStatus, Sequence


@dataclass(slots=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    chunked_prefill: bool


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens computed this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


class Scheduler:
    def __init__(self, limits: SchedulerLimits, blocks: BlockManager):
        self.limits = limits
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.limits.max_num_batched_tokens
        scheduled, budget, preempted = self._schedule_running(budget)
        if not preempted:
            scheduled += self._schedule_waiting(budget)
        return scheduled

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledSeq], int, bool]:
        scheduled: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.allocate(seq, seq.num_computed + num_new):
                preempted = True
                victim = self.running.pop()  # the newest running sequence gives way
                self._preempt(victim)
                if victim is seq:
                    return scheduled, budget, preempted
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1
        return scheduled, budget, preempted

    def _schedule_waiting(self, budget: int) -> list[ScheduledSeq]:
        scheduled: list[ScheduledSeq] = []
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            remaining = seq.num_tokens - seq.num_computed
            num_new = min(remaining, budget) if self.limits.chunked_prefill else remaining
            if num_new > budget or not self.blocks.allocate(seq, seq.num_computed + num_new):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop its KV, keep its tokens, put it back at the queue's head."""
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
