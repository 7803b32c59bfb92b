"""Request and sequence state, owned by one virtual engine."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field, replace

from asyncpp.core.outputs import Logprob, RequestMetrics
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine.detokenizer import IncrementalDetokenizer
from asyncpp.engine.grammar_state import GrammarState
from asyncpp.engine.ngram import DraftState

_seq_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One completion (a request with n > 1 has n of them)."""
    request: "Request"
    index: int
    prompt_token_ids: list[int]
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    num_scheduled: int = 0  # tokens handed to microbatches, those in flight included
    awaiting_sample: bool = False  # a microbatch in flight samples this sequence's next token
    epoch: int = 0  # bumped by preemption: results of older microbatches are stale
    block_table: list[int] = field(default_factory=list)
    block_keys: list = field(default_factory=list)  # prefix-cache keys of its full blocks (BlockManager.keys)
    num_offered_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first scheduled
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    detokenizer: IncrementalDetokenizer | None = None  # when a tokenizer is loaded
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    grammar: GrammarState | None = None  # structured output: what its next token may be
    draft: DraftState | None = None  # speculative decoding: its n-gram index (or none: a draft model) and back-off

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def num_pending(self) -> int:
        """Tokens not yet handed to any microbatch."""
        return self.num_tokens - self.num_scheduled

    @property
    def decoding(self) -> bool:
        """Past its prompt (all of it scheduled): one token at a time, each waiting on the
        previous sample."""
        return self.num_scheduled >= len(self.prompt_token_ids) and self.num_pending <= 1

    @property
    def schedulable(self) -> bool:
        return not self.awaiting_sample and self.num_pending > 0

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + output, without concatenating both."""
        n_prompt = len(self.prompt_token_ids)
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt:end - n_prompt]
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n_prompt]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt's logprobs are asked for and not all known yet (the first sequence of a
        request computes them; it skips the prefix cache then, as vLLM does)."""
        return self.index == 0 and self.request.prompt_logprobs_missing > 0

    @property
    def seed(self) -> int | None:
        seed = self.request.params.seed
        if seed is None or self.index == 0:
            return seed
        return (seed * 1_000_003 + self.index) % (1 << 62)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SeqStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens, capped by max_model_len
    metrics: RequestMetrics
    cache_salt: str | None = None  # only requests with the same salt share cached KV
    seqs: list[Sequence] = field(default_factory=list)
    # By position: None first (nothing predicts the first token), then each prompt token's.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_missing: int = 0
    # `params` as the last stage reads them: without the structured-output spec (which the
    # engine compiled; a schema need not travel with every microbatch).
    sampler_params: SamplingParams | None = None

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)
            self.prompt_logprobs_missing = len(self.prompt_token_ids) - 1
        if self.sampler_params is None:
            self.sampler_params = (self.params if self.params.structured_outputs is None
                                   else replace(self.params, structured_outputs=None))

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
