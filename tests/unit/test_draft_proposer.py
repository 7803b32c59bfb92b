"""A virtual engine's draft-model bookkeeping without a model: what the draft is asked to catch
up on, the proposals it keeps per sequence length, the cut-back after verification, and its blocks."""
from __future__ import annotations

import pytest

from asyncpp.core.outputs import RequestMetrics
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine.draft_proposer import DraftProposer
from asyncpp.engine.draft_runner import DraftJob
from asyncpp.engine.sequence import Request, Sequence

pytestmark = pytest.mark.anyio


class StubRunner:
    """Drafts 7, 8, 9, ... and records each job."""

    def __init__(self) -> None:
        self.jobs: list[DraftJob] = []

    async def propose(self, ve_id: int, jobs: list[DraftJob]) -> tuple[list[list[int]], float]:
        self.jobs.extend(jobs)
        return [list(range(7, 7 + job.k)) for job in jobs], 0.5


def _sequence(prompt: list[int]) -> Sequence:
    request = Request("r", None, prompt, SamplingParams(max_tokens=32), 32, RequestMetrics(0.0))
    request.seqs = [Sequence(request, 0, prompt)]
    return request.seqs[0]


async def test_drafts_catch_up_then_cut_back_to_the_accepted_tokens():
    runner = StubRunner()
    drafts = DraftProposer(0, runner, num_blocks=8, block_size=4)  # type: ignore[arg-type]
    seq = _sequence(list(range(10)))
    assert await drafts.prepare([(seq, 3)]) == 0.5
    assert (runner.jobs[-1].tokens, runner.jobs[-1].start) == (list(range(10)), 0)
    assert drafts.take(seq, 2) == [7, 8]
    assert len(drafts.slots[seq.seq_id].block_table) == 3  # 10 tokens and 2 drafted ones written
    assert await drafts.prepare([(seq, 3)]) is None  # already drafted for this length

    drafts.verified(seq, 1)  # 7 accepted, then the target's own 5
    seq.output_token_ids = [7, 5]
    assert drafts.take(seq, 3) == []  # drafted for another length
    assert await drafts.prepare([(seq, 3)])
    assert (runner.jobs[-1].tokens, runner.jobs[-1].start) == ([5], 11)

    drafts.verified(seq, 3)  # all three: the last was sampled, never computed by the draft
    assert drafts.slots[seq.seq_id].computed == 12 + 2
    drafts.release(seq)
    assert drafts.blocks.num_used == 0 and drafts.take(seq, 3) == []


async def test_a_sequence_released_while_the_draft_runs_keeps_nothing():
    seq = _sequence([3, 4, 5])

    class Releasing(StubRunner):
        async def propose(self, ve_id: int, jobs: list[DraftJob]) -> tuple[list[list[int]], float]:
            drafts.release(seq)  # aborted meanwhile
            return await super().propose(ve_id, jobs)

    drafts = DraftProposer(0, Releasing(), num_blocks=8, block_size=4)  # type: ignore[arg-type]
    assert await drafts.prepare([(seq, 2)])
    assert drafts.take(seq, 2) == [] and drafts.blocks.num_used == 0 and not drafts.slots
