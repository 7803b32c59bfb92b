"""What crosses the executor boundary: one virtual engine's microbatch and its result.

Kept to plain lists and small dataclasses: a microbatch is pickled once per step and
sent to every rank, so it must stay cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from asyncpp.core.sampling_params import SamplingParams


@dataclass(slots=True)
class SampleSpec:
    """How to sample the next token of one sequence (read by the last stage only)."""
    params: SamplingParams
    seed: int | None  # per-sequence seed (request seed + sequence index); None: unseeded
    step: int  # tokens generated so far; with `seed` it keys the random draw
    blocked_token_ids: list[int] = field(default_factory=list)  # masked (min_tokens)
    prompt_token_ids: list[int] | None = None  # only when penalties are active
    output_token_ids: list[int] | None = None  # only when penalties are active
    # Row of MicroBatch.token_bitmask that this sequence's token must pass; a verified proposal's
    # row i (after proposal[:i]) uses grammar_row + i.
    grammar_row: int | None = None


@dataclass(slots=True)
class PromptLogprobsSpec:
    """The prompt's logprobs this chunk yields (read by the last stage only): its first
    `len(targets)` rows predict `targets`, the prompt tokens after them."""
    num: int  # top logprobs per position besides the prompt's own token
    targets: list[int]


@dataclass(slots=True)
class PromptLogprobs:
    """One chunk's prompt logprobs, per target token: its logprob and rank (1: the most
    likely), and the `num` most likely tokens with theirs."""
    logprobs: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]]


@dataclass(slots=True)
class SeqWork:
    """One sequence's share of a microbatch."""
    seq_id: int
    token_ids: list[int]  # the tokens to compute now: a prompt chunk, or the last sampled token
    start_pos: int  # position of token_ids[0] == tokens already in the KV cache
    block_table: list[int]  # physical blocks (in the VE's region) covering start_pos + len(token_ids)
    sample: SampleSpec | None  # set when this step ends with sampling a token
    prompt_logprobs: PromptLogprobsSpec | None = None  # set when the request asks for them
    # Speculative decoding: the last `num_proposed` of token_ids are proposals to verify. The last
    # stage samples each of those positions too and keeps the longest prefix it agrees with.
    num_proposed: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def proposal(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_proposed:]


@dataclass(slots=True)
class MicroBatch:
    ve_id: int
    seqs: list[SeqWork]
    mb_id: int = -1  # set by the executor
    # Structured output: int32 [rows, ceil(vocab / 32)], bit t of row r set when token t may
    # follow (xgrammar's layout); one row per constrained sampled row (SampleSpec.grammar_row).
    token_bitmask: np.ndarray | None = None
    threads: int = 0  # torch threads each rank runs it with; 0: the rank's own count

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(slots=True)
class StepOutput:
    """Sampled tokens, in the order of the microbatch's sequences that sample: one each, or with
    speculative decoding `num_accepted[i] + 1` for the i-th (its accepted proposals, then the
    token sampled after them); logprobs follow token_ids."""
    token_ids: list[int]
    logprobs: list[float] | None = None  # logprob of each sampled token (when any asked)
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per sampled token, best first
    prompt_logprobs: dict[int, PromptLogprobs] | None = None  # by the sequence's index in the microbatch
    num_accepted: list[int] | None = None  # per sampling sequence; None: no proposals in the microbatch


# Tensors passed from one stage to the next: "hidden_states" and, for models that keep
# one, "residual"; each [num_tokens, hidden_size].
IntermediateTensors = dict[str, torch.Tensor]
# Shapes and dtypes of one microbatch's intermediate tensors, by name.
TensorSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]
