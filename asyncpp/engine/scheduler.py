"""Continuous batching for one virtual engine: latency-bounded microbatches (decodes
first, prefill chunks fill the token budget), several microbatches in flight, FCFS,
preemption by recompute.

A sequence may be in several microbatches in flight: consecutive chunks of its prompt
(stages run microbatches in order, so each stage writes a chunk's KV before the next
chunk reads it). It is not scheduled again while a microbatch that samples its next
token is in flight (with speculative decoding, the microbatch that verifies its proposals:
how many of them hold is known only when it returns). Freeing the blocks of a sequence with work in flight (preemption,
abort) is safe for the same reason: any later microbatch that reuses a block runs after
the earlier one on every stage, and rewrites the block before reading it.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from asyncpp.core.config import EngineConfig
from asyncpp.engine.block_manager import BlockManager
from asyncpp.engine.prompt_budget import PromptBudget
from asyncpp.engine.sequence import SeqStatus, Sequence

SOLO_DECODES = 16  # benchmarks/solo_pipeline.py: up to here one microbatch on every core is faster


@dataclass(slots=True)
class SchedulerLimits:
    max_num_seqs: int  # running sequences of this VE
    max_num_batched_tokens: int  # tokens in one microbatch
    chunked_prefill: bool
    decode_groups: int = 1  # the decoding sequences are spread over this many microbatches
    prefill_while_decoding: int | None = None  # prompt tokens per microbatch while any sequence decodes
    adaptive_prefill: bool = False  # ... or as many as measured step costs allow (prompt_budget.py)
    # ... unless this many or fewer decode: then one microbatch, which runs alone in the pipeline
    # with every core per stage (CPU, MicroBatch.threads); 0: never
    solo_decodes: int = 0

    @classmethod
    def of(cls, config: EngineConfig) -> SchedulerLimits:
        solo = SOLO_DECODES if config.solo_threads else 0
        return cls(config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill,
                   config.decode_groups, config.max_prefill_tokens_while_decoding, config.adaptive_prefill_budget,
                   solo)


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # position of the first token computed: seq.num_scheduled when scheduled
    num_new: int
    samples: bool  # this microbatch samples the sequence's next token
    epoch: int  # seq.epoch when scheduled: a preempted sequence ignores older results
    proposal: list[int] = field(default_factory=list)  # speculative tokens after the last one, to verify

    @property
    def num_tokens(self) -> int:
        """Positions this microbatch computes for the sequence, proposals included."""
        return self.num_new + len(self.proposal)


class Proposer(Protocol):
    """Speculative decoding's proposals (engine/speculator.py)."""

    def propose(self, seq: Sequence, room: int) -> list[int]:
        """Tokens to verify after a decoding sequence's last one, at most `room`."""

    def release(self, seq: Sequence) -> None:
        """seq finished, was aborted or preempted (a draft model frees its KV of it)."""


class Scheduler:
    def __init__(self, limits: SchedulerLimits, blocks: BlockManager,
                 decoding_elsewhere: Callable[[], bool] = lambda: False, proposer: Proposer | None = None):
        """`decoding_elsewhere`: whether another VE has decoding sequences (their streams
        wait behind this VE's microbatches in the shared pipeline too). `proposer`: speculative
        tokens for decoding sequences (None: no speculation)."""
        self.limits = limits
        self.blocks = blocks
        self.decoding_elsewhere = decoding_elsewhere
        self.proposer = proposer
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        cap = limits.prefill_while_decoding
        self.prompt_budget = PromptBudget(limits.max_num_batched_tokens if cap is None else cap,
                                          limits.max_num_batched_tokens, limits.adaptive_prefill)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_decoding(self) -> int:
        return sum(1 for s in self.running if s.decoding)

    def schedule(self, in_flight: int = 0) -> list[ScheduledSeq]:
        """The next microbatch, possibly empty: everything runnable is in flight, or only
        a few decodes are ready while `in_flight` microbatches of this VE are out (they
        wait to go with the rest of their share: small microbatches re-read the weights
        for little work)."""
        if in_flight and self._only_a_few_decodes_ready():
            return []
        batch = _Batch(self.limits.max_num_batched_tokens, self._prefill_budget())
        preempted = self._schedule_running(batch)
        if not preempted:
            self._schedule_waiting(batch)
        for item in batch.items:
            item.seq.num_scheduled += item.num_new
            item.seq.awaiting_sample = item.samples
            self.blocks.cache_full_blocks(item.seq, item.seq.num_scheduled)  # after preemptions: all will run
        return batch.items

    def _only_a_few_decodes_ready(self) -> bool:
        if any(s.schedulable and not s.decoding for s in self.running):
            return False  # prompt chunks to send
        if self.waiting and len(self.running) < self.limits.max_num_seqs:
            return False  # prompts to admit
        decoding = [s for s in self.running if s.decoding]
        # The smaller share: with an odd count the groups differ by one, and waiting for the
        # larger would hold the smaller group back until the other returns, every step.
        return sum(1 for s in decoding if s.schedulable) < len(decoding) // self._decode_groups(len(decoding))

    def _decode_groups(self, num_decoding: int) -> int:
        return 1 if num_decoding <= self.limits.solo_decodes else self.limits.decode_groups

    def _decode_share(self, num_decoding: int) -> int:
        return -(-num_decoding // self._decode_groups(num_decoding))

    def _prefill_budget(self) -> int:
        num_decoding = self.num_decoding
        if self.limits.prefill_while_decoding is None or not (num_decoding or self.decoding_elsewhere()):
            return self.limits.max_num_batched_tokens
        if not self.limits.adaptive_prefill:
            return self.prompt_budget.fixed_cap
        return self.prompt_budget.while_decoding(self._decode_share(num_decoding), self._oldest_prompt_wait())

    def _oldest_prompt_wait(self) -> float:
        """Seconds since the oldest request still without its first token arrived."""
        arrivals = [s.request.metrics.arrival_time for s in self.running if not s.decoding]
        if self.waiting:
            arrivals.append(self.waiting[0].request.metrics.arrival_time)
        return time.monotonic() - min(arrivals) if arrivals else 0.0

    def observe_cost(self, batch: list[ScheduledSeq], seconds: float) -> None:
        """A microbatch came back `seconds` after it was submitted: what the adaptive prompt budget
        learns from (nothing to learn with a fixed cap)."""
        if not self.limits.adaptive_prefill:
            return
        decodes = sum(1 for item in batch if item.num_new == 1 and item.samples and item.start > 0)
        prompt_tokens = sum(item.num_new for item in batch) - decodes
        self.prompt_budget.fit.observe(decodes, prompt_tokens, seconds)

    def _schedule_running(self, batch: _Batch) -> bool:
        """Decodes first (a fair share of them per microbatch), then prompt chunks.
        Returns whether a sequence had to be preempted."""
        decoding = [s for s in self.running if s.decoding]
        ready = [s for s in decoding if s.schedulable][:self._decode_share(len(decoding))]
        ready += [s for s in self.running if not s.decoding and s.schedulable]
        for seq in ready:
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted while this microbatch was being built
            num_new = min(seq.num_pending, batch.room(seq))
            if num_new <= 0:
                continue
            proposal = self._proposal(seq, batch.room(seq) - num_new) if seq.decoding else []
            while not self.blocks.allocate(seq, seq.num_scheduled + num_new):
                victim = self.running.pop()  # the newest running sequence gives way
                batch.drop(victim)
                self._preempt(victim)
                if victim is seq:
                    return True
            batch.add(seq, num_new, proposal)
        return False

    def _proposal(self, seq: Sequence, room: int) -> list[int]:
        """Speculative tokens for a decoding sequence, with blocks for them; [] when there are
        none, or their blocks would leave a running sequence none to grow into (proposals
        never cause a preemption)."""
        if self.proposer is None or room <= 0:
            return []
        proposal = self.proposer.propose(seq, room)
        if not proposal:
            return []
        end = seq.num_scheduled + 1 + len(proposal)
        extra = self.blocks.blocks_for(end) - len(seq.block_table)
        if extra > 0 and (self.blocks.num_free - extra < len(self.running) or not self.blocks.allocate(seq, end)):
            return []
        return proposal

    def _schedule_waiting(self, batch: _Batch) -> None:
        while self.waiting and batch.room(self.waiting[0]) > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, batch):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)

    def _admit(self, seq: Sequence, batch: _Batch) -> bool:
        """Start seq after its longest cached prefix and add its first chunk to the batch;
        False (and nothing taken) if the chunk or its blocks do not fit."""
        # A prompt whose logprobs are asked for is computed whole: a cached block has no logits.
        hit = self.blocks.take_cached_prefix(seq) if self.blocks.enable_caching and not seq.wants_prompt_logprobs \
            else 0
        seq.num_computed = seq.num_scheduled = hit
        room = batch.room(seq)
        num_new = min(seq.num_pending, room) if self.limits.chunked_prefill else seq.num_pending
        if num_new > room or not self.blocks.allocate(seq, hit + num_new):
            self.blocks.free(seq)
            seq.num_computed = seq.num_scheduled = 0
            return False
        self.blocks.count_lookup(seq, hit)
        if seq.num_cached_tokens is None:  # a preempted sequence's re-admission is not the user's hit
            seq.num_cached_tokens = hit
        # Keyed now, so a prompt admitted after it in this microbatch shares it: each layer
        # writes the whole microbatch's KV before any sequence attends to it.
        self.blocks.cache_full_blocks(seq, hit + num_new)
        batch.add(seq, num_new)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop its KV, keep its tokens, put it back at the queue's head."""
        self.blocks.free(seq)
        self._release_draft(seq)
        seq.num_computed = seq.num_scheduled = 0
        seq.awaiting_sample = False
        seq.epoch += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def preempt_all(self) -> int:
        """Every running sequence back to the waiting queue's head, in its order, to recompute
        its KV (new stages have empty caches). Only with nothing in flight. Returns how many."""
        running, self.running = self.running, []
        for seq in reversed(running):
            self._preempt(seq)
        return len(running)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        self._release_draft(seq)

    def _release_draft(self, seq: Sequence) -> None:
        if self.proposer is not None:
            self.proposer.release(seq)


class _Batch:
    """The microbatch being built: what is left of its token budget, and of the part of it
    prompt chunks may take."""

    def __init__(self, budget: int, prefill_budget: int):
        self.budget = budget
        self.prefill_budget = prefill_budget
        self.items: list[ScheduledSeq] = []

    def room(self, seq: Sequence) -> int:
        """Tokens `seq` may add: a decode needs only the budget, a prompt chunk its share too."""
        return self.budget if seq.decoding else min(self.budget, self.prefill_budget)

    def add(self, seq: Sequence, num_new: int, proposal: list[int] | None = None) -> None:
        if not seq.decoding:
            self.prefill_budget -= num_new
        samples = seq.num_scheduled + num_new == seq.num_tokens
        item = ScheduledSeq(seq, seq.num_scheduled, num_new, samples, seq.epoch, proposal or [])
        self.items.append(item)
        self.budget -= item.num_tokens

    def drop(self, seq: Sequence) -> None:
        for item in self.items:
            if item.seq is seq:
                self.items.remove(item)
                self.budget += item.num_tokens
                if not seq.decoding:
                    self.prefill_budget += item.num_new
                return
