"""What a virtual engine proposes for speculative decoding, when, and how much of it was accepted.

The proposals of a decoding sequence ride in its microbatch as extra positions after its last
token; the last stage samples every position as if the proposals before it had been accepted
and keeps the longest prefix that it sampled itself (worker/verification.py). This module
decides which sequences propose and how many tokens, and counts the outcome. The tokens come
from the sequence's own n-grams (ngram.py) or from a draft model run before the step
(draft_proposer.py).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from asyncpp.core.speculative import SpeculativeConfig
from asyncpp.engine.draft_proposer import DraftProposer
from asyncpp.engine.ngram import DraftState, NgramIndex
from asyncpp.engine.sequence import Sequence


@dataclass(slots=True)
class SpecDecodeStats:
    """vLLM's speculative-decoding counters (spec_decode_num_drafts, ...)."""
    num_drafts: int = 0  # verified proposals (one per sequence and step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts whose token i was accepted
    draft_seconds: float = 0.0  # draft model: seconds its forwards took (0 for n-grams)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verified draft yields, the bonus token included (vLLM's log line)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def since(self, before: SpecDecodeStats) -> SpecDecodeStats:
        """The counts between `before` (an earlier snapshot of the same counters) and these."""
        return SpecDecodeStats(self.num_drafts - before.num_drafts, self.num_draft_tokens - before.num_draft_tokens,
                               self.num_accepted_tokens - before.num_accepted_tokens,
                               [b - a for a, b in zip(before.accepted_per_position, self.accepted_per_position)],
                               self.draft_seconds - before.draft_seconds)

    def add(self, other: SpecDecodeStats) -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.draft_seconds += other.draft_seconds
        width = max(len(self.accepted_per_position), len(other.accepted_per_position))
        mine = self.accepted_per_position + [0] * (width - len(self.accepted_per_position))
        theirs = other.accepted_per_position + [0] * (width - len(other.accepted_per_position))
        self.accepted_per_position = [a + b for a, b in zip(mine, theirs)]


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int, drafts: DraftProposer | None = None):
        """`drafts`: the draft model's proposals (method "draft_model"); else n-grams."""
        self.config = config
        self.max_model_len = max_model_len
        self.drafts = drafts
        self.stats = SpecDecodeStats(accepted_per_position=[0] * config.num_speculative_tokens)
        self.enabled = True

    def set_load(self, num_running: int) -> None:
        """Proposals stop while the engine runs `disable_by_batch_size` sequences or more."""
        self.enabled = num_running < self.config.disable_by_batch_size

    def wanted(self, seq: Sequence) -> int:
        """How many tokens seq may propose at the next step; 0: none (a draft model drafts these)."""
        if seq.draft is not None and seq.draft.pause:
            return 0
        return self._most(seq, self.config.num_speculative_tokens)

    def _most(self, seq: Sequence, room: int) -> int:
        if not self.enabled:
            return 0
        return min(self.config.num_speculative_tokens, room,
                   seq.request.max_tokens - len(seq.output_token_ids) - 1,  # the bonus token counts too
                   self.max_model_len - seq.num_tokens - 1)

    async def prepare(self, seqs: Iterable[Sequence]) -> bool:
        """Draft model: run the draft for these decoding sequences, so that `propose` finds their
        tokens; False when there was nothing to run (n-grams need no preparation)."""
        if self.drafts is None:
            return False
        seconds = await self.drafts.prepare([(seq, most) for seq in seqs if (most := self.wanted(seq)) > 0])
        if seconds is None:
            return False
        self.stats.draft_seconds += seconds
        return True

    def propose(self, seq: Sequence, room: int) -> list[int]:
        """Tokens to verify after seq's last one, at most `room`; [] when it should not speculate now."""
        most = self._most(seq, room)
        if most < 1:
            return []
        state = seq.draft
        if state is None:
            index = None if self.drafts is not None else NgramIndex(self.config.prompt_lookup_min,
                                                                     self.config.prompt_lookup_max)
            state = seq.draft = DraftState(index)
        if state.pause:
            state.pause -= 1
            return []
        if state.index is None:
            assert self.drafts is not None
            proposal = self.drafts.take(seq, most)
        else:
            proposal = state.index.propose(seq.tokens, seq.num_tokens, most)
        if proposal and seq.grammar is not None:
            # A few matcher steps here, as the VE's advance with each sampled token; the masks of
            # the verified rows, far dearer, fill in a worker thread.
            proposal = proposal[:seq.grammar.valid_prefix(proposal)]
        return proposal

    def verified(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """A draft of `proposed` tokens came back with its first `accepted` taken."""
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += proposed
        stats.num_accepted_tokens += accepted
        for i in range(accepted):
            stats.accepted_per_position[i] += 1
        if seq.draft is not None:
            seq.draft.verified(accepted)
        if self.drafts is not None:
            self.drafts.verified(seq, accepted)

    def release(self, seq: Sequence) -> None:
        """seq finished, was aborted or preempted: the draft's KV of it goes."""
        if self.drafts is not None:
            self.drafts.release(seq)
