"""One virtual engine's draft-model proposals: which tokens the draft has seen of each sequence,
its KV blocks, and the proposals it drafted before the step that verifies them.

Before a VE schedules, it drafts for its decoding sequences that may speculate: the draft catches
up on the tokens it has not seen (after a preemption, the whole sequence) and then runs k greedy
steps (a deterministic draft keeps verification's rule exact). The KV of the drafted tokens
stays; once verification says how many were accepted, the draft's computed length is cut back
to them and the positions past it are rewritten by its next run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from asyncpp.engine.block_manager import BlockManager
from asyncpp.engine.draft_runner import DraftJob, DraftRunner
from asyncpp.engine.sequence import Sequence


@dataclass(slots=True, eq=False)
class DraftSlot:
    """The draft model's view of one sequence."""
    block_table: list[int] = field(default_factory=list)  # blocks of the draft's KV region
    num_offered_blocks: int = 0  # never cached: the draft's blocks are not shared
    computed: int = 0  # tokens whose draft KV holds the sequence's own tokens
    proposal: list[int] = field(default_factory=list)
    proposal_at: int = -1  # the sequence's length when `proposal` was drafted


class DraftProposer:
    def __init__(self, ve_id: int, runner: DraftRunner, num_blocks: int, block_size: int):
        self.ve_id = ve_id
        self.runner = runner
        self.blocks = BlockManager(num_blocks, block_size)
        self.slots: dict[int, DraftSlot] = {}  # by seq_id

    async def prepare(self, wanted: list[tuple[Sequence, int]]) -> float | None:
        """Draft up to `k` tokens for each (sequence, k) without a proposal for its current
        length; the seconds the draft computed, None when none needed one. Sequences released
        meanwhile keep nothing."""
        jobs: list[tuple[Sequence, DraftSlot, DraftJob]] = []
        for seq, k in wanted:
            slot = self.slots.setdefault(seq.seq_id, DraftSlot())
            # Up to the last drafted token's position: the k-th is sampled, never written.
            if slot.proposal_at == seq.num_tokens or not self.blocks.allocate(slot, seq.num_tokens + k - 1):
                continue
            jobs.append((seq, slot, DraftJob(seq.tokens(slot.computed, seq.num_tokens), slot.computed,
                                             list(slot.block_table), k)))
        if not jobs:
            return None
        proposals, seconds = await self.runner.propose(self.ve_id, [job for _, _, job in jobs])
        for (seq, slot, _), proposal in zip(jobs, proposals):
            if self.slots.get(seq.seq_id) is slot:
                slot.computed, slot.proposal, slot.proposal_at = seq.num_tokens, proposal, seq.num_tokens
        return seconds

    def take(self, seq: Sequence, most: int) -> list[int]:
        """The drafted tokens after seq's last one, at most `most`; [] when none were drafted for it."""
        slot = self.slots.get(seq.seq_id)
        if slot is None or slot.proposal_at != seq.num_tokens:
            return []
        return slot.proposal[:most]

    def verified(self, seq: Sequence, accepted: int) -> None:
        """The first `accepted` drafted tokens were the target's too: their draft KV stands (but for
        the last drafted one, which the draft sampled without computing)."""
        slot = self.slots.get(seq.seq_id)
        if slot is None or slot.proposal_at < 0:
            return
        slot.computed = slot.proposal_at + min(accepted, len(slot.proposal) - 1)
        self.blocks.truncate(slot, slot.computed + 1)

    def release(self, seq: Sequence) -> None:
        slot = self.slots.pop(seq.seq_id, None)
        if slot is not None:
            self.blocks.free(slot)
