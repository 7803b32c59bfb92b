"""A virtual engine: its own scheduler and KV-block share, feeding the shared executor."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import anyio
import numpy as np

from asyncpp.core.config import EngineConfig
from asyncpp.core.errors import EngineDeadError, MicrobatchError
from asyncpp.core.microbatch import MicroBatch, PromptLogprobsSpec, SampleSpec, SeqWork, StepOutput
from asyncpp.engine.block_manager import BlockManager
from asyncpp.engine.draft_proposer import DraftProposer
from asyncpp.engine.draft_runner import DraftRunner
from asyncpp.engine.grammar_state import GrammarState
from asyncpp.engine.output_processor import OutputProcessor, SampledToken
from asyncpp.engine.request_stream import RequestStream
from asyncpp.engine.scheduler import SOLO_DECODES, ScheduledSeq, Scheduler, SchedulerLimits
from asyncpp.engine.sequence import Request, Sequence
from asyncpp.engine.speculator import SpecDecodeStats, Speculator
from asyncpp.executor.executor import Executor
from asyncpp.executor.supervisor import Supervisor

log = logging.getLogger(__name__)

MaskRows = tuple[GrammarState, list[int]]  # a constrained sample's grammar and the proposal it verifies


class VirtualEngineOwner(Protocol):
    """What a VE asks of whoever holds every VE (the engine's router)."""

    def request_done(self, request_id: str) -> None:
        """The request ended here (finished, aborted or failed): forget where it ran."""

    def decoding_besides(self, ve_id: int) -> bool:
        """Whether another VE has decoding sequences (their streams wait behind this VE's
        microbatches in the shared pipeline too)."""

    def num_running_seqs(self) -> int:
        """Running sequences, every VE's together (speculation turns off above a batch size)."""

    def num_unfinished_seqs(self) -> int:
        """Running and waiting sequences, every VE's together."""


def solo_threads(mb: MicroBatch, solo: int, num_unfinished: int) -> int:
    """`solo` (every stage's cores, for each stage in turn; the executor keeps them only if the
    pipeline is empty, and holds the next microbatch back until this one is done) under a light
    load, for a microbatch that samples every sequence: a prompt's middle chunk is followed at
    once by the next, which would have to wait."""
    light = num_unfinished <= SOLO_DECODES
    return solo if light and all(s.sample is not None for s in mb.seqs) else 0


@dataclass(slots=True)
class VirtualEngineStats:
    """One VE's counters; the engine's stats are their sums (same names)."""
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0  # held by some sequence
    kv_blocks_cached: int = 0  # cached prefixes no sequence holds (freed when blocks are needed)
    kv_blocks_total: int = 0
    draft_kv_blocks_used: int = 0  # draft-model speculation: blocks of the draft's KV held
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found there (not computed)


@dataclass(slots=True)
class TokenCounters:
    prompt_tokens: int = 0
    generation_tokens: int = 0


class VirtualEngine:
    def __init__(self, ve_id: int, config: EngineConfig, num_blocks: int, supervisor: Supervisor,
                 processor: OutputProcessor, owner: VirtualEngineOwner, draft: DraftRunner | None = None,
                 draft_blocks: int = 0):
        """`num_blocks`: this VE's share of the KV blocks every rank holds. `draft`: the draft model
        (draft-model speculation), shared by every VE, of whose KV this VE holds `draft_blocks`."""
        self.ve_id = ve_id
        self._bitmask_words = -(-config.shape.vocab_size // 32)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.drafts = None if draft is None else DraftProposer(ve_id, draft, draft_blocks, config.block_size)
        self.speculator = Speculator(config.speculative, config.max_model_len, self.drafts) \
            if config.speculative else None
        self.scheduler = Scheduler(SchedulerLimits.of(config), self.blocks, partial(owner.decoding_besides, ve_id),
                                   self.speculator)
        self.max_in_flight_per_ve = config.max_in_flight_per_ve
        self.solo_threads = config.solo_threads
        self.supervisor = supervisor
        self.processor = processor
        self.owner = owner
        self.counters = TokenCounters()
        self._requests: dict[str, tuple[Request, RequestStream]] = {}
        self._in_flight = 0
        self._error: BaseException | None = None
        self._failed: Executor | None = None  # the executor that raised self._error
        self._kv_owner: Executor | None = None  # the executor whose KV the cached blocks hold
        self._wake = anyio.Event()
        self._paused = False  # a live move: schedule nothing until resumed
        self._drained = anyio.Event()  # set as each microbatch of this VE returns

    # -- called by the engine and its router -----------------------------------------
    @property
    def num_unfinished_seqs(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def snapshot(self) -> VirtualEngineStats:
        blocks, scheduler = self.blocks, self.scheduler
        return VirtualEngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_blocks_used=blocks.num_used, kv_blocks_cached=blocks.num_cached_free, kv_blocks_total=blocks.num_blocks,
            prompt_tokens_total=self.counters.prompt_tokens, generation_tokens_total=self.counters.generation_tokens,
            num_preemptions=scheduler.num_preemptions, prefix_cache_queries=blocks.counters.queries,
            prefix_cache_hits=blocks.counters.hits,
            draft_kv_blocks_used=self.drafts.blocks.num_used if self.drafts is not None else 0)

    def add(self, request: Request, stream: RequestStream) -> None:
        for seq in request.seqs:
            self.processor.start(seq)
            self.scheduler.add(seq)
        self._requests[request.request_id] = (request, stream)
        self.counters.prompt_tokens += len(request.prompt_token_ids)
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        """Free the request's blocks now and end its stream with finish_reason 'abort'.
        Microbatches in flight for it are ignored when they return (see scheduler.py on
        why freeing their blocks now is safe)."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return False
        request, stream = entry
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                seq.finish("abort")
        request.metrics.finished_time = time.monotonic()
        stream.put(self.processor.request_output(request))
        self._wake.set()
        return True

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        return self.speculator.stats if self.speculator is not None else None

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; returns how many cached, unused blocks that freed."""
        return self.blocks.reset_cache()

    async def pause(self) -> None:
        """Send no more microbatches, and return once those in flight have come back."""
        self._paused = True
        while self._in_flight:
            self._drained = anyio.Event()
            await self._drained.wait()

    def recompute_all(self) -> int:
        """While paused: every running sequence re-prefills once resumed (the stages it will run
        on hold none of its KV); returns how many."""
        count = self.scheduler.preempt_all()
        self.blocks.reset_cache()
        return count

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def fail_all(self, error: BaseException) -> None:
        self._fail_requests([request for request, _ in self._requests.values()], error)

    def _fail_requests(self, requests: Iterable[Request], error: BaseException) -> None:
        """End these requests with `error` and free their blocks."""
        for request in requests:
            entry = self._requests.pop(request.request_id, None)
            if entry is None:
                continue
            for seq in request.seqs:
                if not seq.finished:
                    self.scheduler.remove(seq)
                    seq.finish("abort")
            entry[1].fail(error)
            self.owner.request_done(request.request_id)

    # -- the loop ------------------------------------------------------------------
    async def run(self) -> BaseException:
        """The loop, until the engine stops; returns why it cannot serve again. A failed
        pipeline fails this VE's requests; once the supervisor has restarted the stages,
        the loop starts over."""
        try:
            while True:
                try:
                    await self._loop()
                except EngineDeadError as e:
                    self.fail_all(e)
                    assert self._failed is not None
                    if not await self.supervisor.recovered(self._failed):
                        return self.supervisor.dead or e
        except Exception as e:  # a bug must fail requests loudly, not hang them
            log.exception("virtual engine %d crashed", self.ve_id)
            dead = EngineDeadError(f"virtual engine {self.ve_id} crashed: {e!r}", permanent=True)
            self.fail_all(dead)
            return dead

    async def _loop(self) -> None:
        """Keep up to `max_in_flight_per_ve` microbatches of this VE in the pipeline."""
        self._error = self._failed = None
        async with anyio.create_task_group() as tg:
            while self._error is None:
                self._forget_lost_kv()
                if self.speculator is not None:
                    self.speculator.set_load(self.owner.num_running_seqs())
                    if await self._draft():
                        continue  # sequences may have ended or failed while the draft ran
                batch = self._schedule()
                if batch:
                    self._in_flight += 1
                    mb, grammars = self._microbatch(batch)
                    if self.solo_threads:
                        mb.threads = solo_threads(mb, self.solo_threads, self.owner.num_unfinished_seqs())
                    if grammars:  # in a worker thread (xgrammar lets go of the GIL): other VEs run meanwhile
                        mb.token_bitmask = await anyio.to_thread.run_sync(self._token_bitmask, grammars)
                    tg.start_soon(self._run_microbatch, batch, mb)
                    continue
                await self._wake.wait()
                self._wake = anyio.Event()
            tg.cancel_scope.cancel()
        assert self._error is not None
        raise self._error

    async def _draft(self) -> bool:
        """Draft-model speculation: draft for the decoding sequences the next microbatch may take;
        whether the draft ran."""
        if not self._may_send():
            return False
        assert self.speculator is not None
        return await self.speculator.prepare(s for s in self.scheduler.running if s.decoding and s.schedulable)

    def _may_send(self) -> bool:
        """Another microbatch may go out now: not paused, room in the pipeline for this VE."""
        return not self._paused and self._in_flight < self.max_in_flight_per_ve

    def _schedule(self) -> list[ScheduledSeq]:
        if not self._may_send():
            return []
        return self.scheduler.schedule(self._in_flight)

    async def _run_microbatch(self, batch: list[ScheduledSeq], mb: MicroBatch) -> None:
        executor = self.supervisor.executor
        assert executor is not None
        try:
            started = time.monotonic()
            output = await executor.submit(mb)
            self.scheduler.observe_cost(batch, time.monotonic() - started)
            self._apply(batch, output)
        except MicrobatchError as e:
            self._fail_requests({item.seq.request for item in batch} | self._sharing(batch, mb), e)
        except Exception as e:
            if self._error is None:
                self._error, self._failed = e, executor
        finally:
            self._in_flight -= 1
            self._wake.set()
            self._drained.set()

    def _forget_lost_kv(self) -> None:
        """Restarted stages start with empty KV caches: no cached prefix survives them."""
        executor = self.supervisor.executor
        if executor is not self._kv_owner:
            self.blocks.reset_cache()
            self._kv_owner = executor

    def _sharing(self, batch: list[ScheduledSeq], mb: MicroBatch) -> set[Request]:
        """After `mb` failed, the KV it was writing may be wrong: its blocks are un-keyed,
        and the requests of other sequences already sharing them fail too."""
        written = set().union(*(self.blocks.written_by(item.seq, item.epoch, work.block_table, work.start_pos,
                                                       work.start_pos + work.num_tokens)
                                for item, work in zip(batch, mb.seqs)))
        self.blocks.uncache(written)
        return {seq.request for seq in self.scheduler.running if written.intersection(seq.block_table)}

    def _microbatch(self, batch: list[ScheduledSeq]) -> tuple[MicroBatch, list[MaskRows]]:
        """The microbatch, and the grammars of its constrained samples (their masks' rows, in order:
        one per verified row, so 1 + the proposal's length). Their states stay put until it
        returns: none of them has another sample in flight."""
        seqs: list[SeqWork] = []
        constrained: list[MaskRows] = []
        num_rows = 0
        for item in batch:
            seq, start = item.seq, item.start
            spec = self._sample_spec(seq) if item.samples else None
            if spec is not None and seq.grammar is not None and seq.grammar.constrains:
                spec.grammar_row = num_rows
                constrained.append((seq.grammar, item.proposal))
                num_rows += 1 + len(item.proposal)
            # Copies: later scheduling grows the live block table while this one is in flight.
            seqs.append(SeqWork(seq.seq_id, seq.tokens(start, start + item.num_new) + item.proposal, start,
                                list(seq.block_table), spec, _prompt_logprobs_spec(seq, start, item.num_new),
                                len(item.proposal)))
        return MicroBatch(self.ve_id, seqs), constrained

    def _token_bitmask(self, grammars: list[MaskRows]) -> np.ndarray:
        """The masks of each constrained sequence's verified rows (0.01 to a few ms a row, by
        grammar and state: benchmarks/grammar_mask_cost.py)."""
        bitmask = np.zeros((sum(1 + len(proposal) for _, proposal in grammars), self._bitmask_words), dtype=np.int32)
        row = 0
        for grammar, proposal in grammars:
            grammar.fill_masks(bitmask, row, proposal)
            row += 1 + len(proposal)
        return bitmask

    def _sample_spec(self, seq: Sequence) -> SampleSpec:
        params = seq.request.sampler_params
        assert params is not None
        step = len(seq.output_token_ids)
        blocked = []
        if step < params.min_tokens:
            blocked = params.stop_token_ids + ([] if params.ignore_eos else list(self.processor.eos_token_ids))
        spec = SampleSpec(params, seq.seed, step, blocked)
        if params.has_penalties:
            spec.prompt_token_ids = seq.prompt_token_ids
            spec.output_token_ids = list(seq.output_token_ids)
        return spec

    def _apply(self, batch: list[ScheduledSeq], output: StepOutput) -> None:
        touched: dict[str, Request] = {}
        emitted = _emitted(output)
        for index, item in enumerate(batch):
            seq = item.seq
            sampled = next(emitted) if item.samples else []
            if seq.finished or item.epoch != seq.epoch:  # aborted, or preempted, while in flight
                continue
            accepted = len(sampled) - 1 if item.proposal else 0
            seq.num_computed = item.start + item.num_new + accepted
            if output.prompt_logprobs and index in output.prompt_logprobs:
                self.processor.add_prompt_logprobs(seq.request, item.start + 1, output.prompt_logprobs[index])
            if not sampled:
                continue
            seq.awaiting_sample = False
            if item.proposal:
                self._settle_proposal(item, accepted)
            if not self._append(seq, sampled):
                continue
            if seq.finished:
                self.scheduler.remove(seq)
            touched[seq.request.request_id] = seq.request
        now = time.monotonic()
        for request_id, request in touched.items():
            self._emit(request_id, request, now)

    def _settle_proposal(self, item: ScheduledSeq, accepted: int) -> None:
        """The verified proposal's outcome: the accepted tokens count as computed; blocks taken
        only for rejected ones go back (their KV is garbage, overwritten if ever reused)."""
        seq = item.seq
        assert self.speculator is not None
        self.speculator.verified(seq, len(item.proposal), accepted)
        seq.num_scheduled = seq.num_computed
        self.blocks.truncate(seq, seq.num_computed + 1)  # + the token sampled after them, computed next

    def _append(self, seq: Sequence, sampled: list[SampledToken]) -> bool:
        """Add the sampled tokens in order, up to the first that finishes the sequence (a
        stop token or string, max_tokens); False when the request failed instead."""
        for token in sampled:
            if seq.grammar is not None and not seq.grammar.advance([token.token_id]):
                self._fail_requests([seq.request], RuntimeError(
                    f"sampled token {token.token_id} breaks the request's structured-output grammar"))
                return False
            self.processor.append(seq, token)
            self.counters.generation_tokens += 1
            if seq.grammar is not None and seq.grammar.terminated and not seq.finished:
                seq.finish("stop")  # the grammar is complete (even under ignore_eos)
            if seq.finished:
                break
        return True

    def _emit(self, request_id: str, request: Request, now: float) -> None:
        entry = self._requests.get(request_id)
        if entry is None:
            return
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        if request.finished:
            request.metrics.finished_time = now
            del self._requests[request_id]
            self.owner.request_done(request_id)
        entry[1].put(self.processor.request_output(request))


def _emitted(output: StepOutput) -> Iterator[list[SampledToken]]:
    """Each sampling sequence's tokens, in order: one, or its accepted proposals and the next."""
    counts = [1] * len(output.token_ids) if output.num_accepted is None else [a + 1 for a in output.num_accepted]
    i = 0
    for count in counts:
        yield [SampledToken(output.token_ids[j],
                            output.logprobs[j] if output.logprobs is not None else None,
                            output.top_logprobs[j] if output.top_logprobs is not None else None)
               for j in range(i, i + count)]
        i += count


def _prompt_logprobs_spec(seq: Sequence, start: int, num_new: int) -> PromptLogprobsSpec | None:
    """Row i of the chunk [start, start + num_new) predicts prompt token start + i + 1."""
    if not seq.wants_prompt_logprobs:
        return None
    prompt = seq.prompt_token_ids
    end = min(start + num_new, len(prompt) - 1)
    if end <= start:
        return None
    return PromptLogprobsSpec(seq.request.params.prompt_logprobs or 0, prompt[start + 1:end + 1])
