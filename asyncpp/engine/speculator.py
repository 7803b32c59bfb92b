"""What a virtual engine proposes for speculative decoding, when, and how much of it was accepted.

The proposals of a decoding sequence ride in its microbatch as extra positions after its last
token; the last stage samples every position as if the proposals before it had been accepted
and keeps the longest prefix that it sampled itself (worker/verification.py). This module
decides which sequences propose and how many tokens, and counts the outcome.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from asyncpp.core.speculative import SpeculativeConfig
from asyncpp.engine.ngram import DraftState, NgramIndex
from asyncpp.engine.sequence import Sequence


@dataclass(slots=True)
class SpecDecodeStats:
    """vLLM's speculative-decoding counters (spec_decode_num_drafts, ...)."""
    num_drafts: int = 0  # verified proposals (one per sequence and step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts whose token i was accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verified draft yields, the bonus token included (vLLM's log line)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def add(self, other: SpecDecodeStats) -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        width = max(len(self.accepted_per_position), len(other.accepted_per_position))
        mine = self.accepted_per_position + [0] * (width - len(self.accepted_per_position))
        theirs = other.accepted_per_position + [0] * (width - len(other.accepted_per_position))
        self.accepted_per_position = [a + b for a, b in zip(mine, theirs)]


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.stats = SpecDecodeStats(accepted_per_position=[0] * config.num_speculative_tokens)
        self.enabled = True

    def set_load(self, num_running: int) -> None:
        """Proposals stop while the engine runs `disable_by_batch_size` sequences or more."""
        self.enabled = num_running < self.config.disable_by_batch_size

    def propose(self, seq: Sequence, room: int) -> list[int]:
        """Tokens to verify after seq's last one, at most `room`; [] when it should not speculate now."""
        if not self.enabled:
            return []
        most = min(self.config.num_speculative_tokens, room,
                   seq.request.max_tokens - len(seq.output_token_ids) - 1,  # the bonus token counts too
                   self.max_model_len - seq.num_tokens - 1)
        if most < 1:
            return []
        state = seq.draft
        if state is None:
            state = seq.draft = DraftState(NgramIndex(self.config.prompt_lookup_min, self.config.prompt_lookup_max))
        if state.pause:
            state.pause -= 1
            return []
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
