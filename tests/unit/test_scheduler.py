"""Scheduler and block manager, without a model."""
import time

from asyncpp.core.outputs import RequestMetrics
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine.block_manager import BlockManager
from asyncpp.engine.scheduler import ScheduledSeq, Scheduler, SchedulerLimits
from asyncpp.engine.sequence import Request, SeqStatus, Sequence


def make_seq(prompt_len: int) -> Sequence:
    req = Request("r", None, list(range(prompt_len)), SamplingParams(), 16, RequestMetrics(0.0))
    seq = Sequence(req, 0, req.prompt_token_ids)
    req.seqs = [seq]
    return seq


def run_step(sched: Scheduler, token: int = 7) -> list:
    """Schedule one microbatch and apply its result at once, as a VE does on return."""
    batch = sched.schedule()
    for item in batch:
        complete(item, token)
    return batch


def complete(item, token: int = 7) -> None:
    item.seq.num_computed = item.start + item.num_new
    if item.samples:
        item.seq.awaiting_sample = False
        item.seq.output_token_ids.append(token)


def test_chunked_prefill_splits_by_token_budget():
    sched = Scheduler(SchedulerLimits(8, 32, True), BlockManager(64, 16))
    a, b = make_seq(50), make_seq(10)
    sched.add(a), sched.add(b)
    first = run_step(sched)
    assert [(s.seq, s.num_new) for s in first] == [(a, 32)]
    second = run_step(sched)
    assert [(s.seq, s.num_new) for s in second] == [(a, 18), (b, 10)]
    third = run_step(sched)
    assert [(s.seq, s.num_new) for s in third] == [(a, 1), (b, 1)]


def test_no_chunking_waits_for_budget():
    sched = Scheduler(SchedulerLimits(8, 64, False), BlockManager(64, 16))
    a, b = make_seq(40), make_seq(40)
    sched.add(a), sched.add(b)
    assert [(s.seq, s.num_new) for s in run_step(sched)] == [(a, 40)]
    assert [(s.seq, s.num_new) for s in run_step(sched)] == [(a, 1), (b, 40)]


def test_preemption_frees_newest_and_requeues_it_first():
    blocks = BlockManager(4, 4)
    sched = Scheduler(SchedulerLimits(8, 64, True), blocks)
    a, b = make_seq(8), make_seq(8)
    sched.add(a), sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks each, cache full
    assert blocks.num_free == 0
    batch = run_step(sched)  # a needs a third block: b is preempted
    assert [s.seq for s in batch] == [a]
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.block_table == []
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    assert b.tokens(0, b.num_tokens) == list(range(8)) + [7]


def test_remove_frees_blocks():
    blocks = BlockManager(8, 4)
    sched = Scheduler(SchedulerLimits(8, 64, True), blocks)
    a = make_seq(10)
    sched.add(a)
    run_step(sched)
    assert blocks.num_used == 3
    sched.remove(a)
    assert blocks.num_used == 0 and not sched.waiting and not sched.running


def test_max_num_seqs_caps_running():
    sched = Scheduler(SchedulerLimits(2, 256, True), BlockManager(64, 16))
    seqs = [make_seq(5) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    assert [s.seq for s in run_step(sched)] == seqs[:2]
    assert len(sched.waiting) == 1


def test_prompt_chunks_go_in_flight_one_after_another():
    sched = Scheduler(SchedulerLimits(8, 16, True), BlockManager(64, 4))
    a = make_seq(40)
    sched.add(a)
    chunks = [sched.schedule() for _ in range(3)]  # nothing returns in between
    assert [(c[0].start, c[0].num_new, c[0].samples) for c in chunks] == [(0, 16, False), (16, 16, False),
                                                                          (32, 8, True)]
    assert sched.schedule() == []  # the next token waits on the sample in flight
    for c in chunks:
        complete(c[0])
    assert [(i.start, i.num_new) for i in sched.schedule()] == [(40, 1)]


def test_decodes_first_and_spread_over_groups():
    sched = Scheduler(SchedulerLimits(8, 64, True, decode_groups=2), BlockManager(64, 16))
    seqs = [make_seq(4) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    run_step(sched)  # all four prefilled and sampled once
    late = make_seq(30)
    sched.add(late)
    first, second = sched.schedule(), sched.schedule()
    assert [i.seq for i in first][:2] == seqs[:2] and [i.seq for i in second][:2] == seqs[2:]
    assert first[2].seq is late  # the prompt fills the rest of the first microbatch's budget
    assert sched.schedule() == []


def test_preempted_sequence_ignores_its_stale_microbatch():
    blocks = BlockManager(4, 4)
    sched = Scheduler(SchedulerLimits(8, 64, True), blocks)
    a, b = make_seq(8), make_seq(8)
    sched.add(a), sched.add(b)
    run_step(sched)
    in_flight = sched.schedule()  # a needs a third block: b (newest) gives way
    assert [i.seq for i in in_flight] == [a] and b.epoch == 1 and b.status is SeqStatus.WAITING
    complete(in_flight[0])
    again = sched.schedule()
    assert [(i.seq, i.start, i.epoch) for i in again] == [(a, 9, 0)]


def test_prompt_chunks_shrink_while_streams_decode():
    limits = SchedulerLimits(8, 64, True, prefill_while_decoding=8)
    sched = Scheduler(limits, BlockManager(64, 16))
    a = make_seq(4)
    sched.add(a)
    run_step(sched)  # a decodes from now on
    b = make_seq(100)
    sched.add(b)
    assert [(i.seq, i.num_new) for i in sched.schedule()] == [(a, 1), (b, 8)]
    alone = Scheduler(limits, BlockManager(64, 16))
    c = make_seq(100)
    alone.add(c)
    assert [i.num_new for i in alone.schedule()] == [64]  # nobody waits on it: the whole budget
    other = Scheduler(limits, BlockManager(64, 16), decoding_elsewhere=lambda: True)
    d = make_seq(100)
    other.add(d)
    assert [i.num_new for i in other.schedule()] == [8]  # another VE's streams wait behind it too


def adaptive_with_a_stream(arrival_time: float, costs: tuple[float, float, float] | None = None
                           ) -> tuple[Scheduler, Sequence]:
    """A scheduler whose prompt share follows step costs, one stream decoding, a 100-token
    prompt that arrived at `arrival_time`; `costs` (base, per decode, per prompt token) fitted."""
    sched = Scheduler(SchedulerLimits(8, 64, True, prefill_while_decoding=8, adaptive_prefill=True),
                      BlockManager(64, 16))
    stream = make_seq(4)
    sched.add(stream)
    run_step(sched)
    if costs is not None:
        base, per_decode, per_prompt = costs
        for i in range(40):
            decodes, prompt = 1 + i % 7, 16 * (i % 5) if i % 2 else 0
            sched.prompt_budget.fit.observe(decodes, prompt, base + per_decode * decodes + per_prompt * prompt)
    prompt = make_seq(100)
    prompt.request.metrics.arrival_time = arrival_time
    sched.add(prompt)
    return sched, prompt


def test_the_adaptive_prompt_share_is_the_fixed_cap_until_costs_are_known():
    sched, prompt = adaptive_with_a_stream(time.monotonic())
    assert [i.num_new for i in sched.schedule() if i.seq is prompt] == [8]


def test_the_adaptive_prompt_share_follows_the_fitted_costs():
    # A decode step of one stream costs 101 s, a prompt token 10 s: the mixed step may take
    # 2.5x, so 1.5 * 101 / 10 = 15 prompt tokens; a prompt is overdue only after 16 such steps.
    sched, prompt = adaptive_with_a_stream(time.monotonic(), (100.0, 1.0, 10.0))
    assert [i.num_new for i in sched.schedule() if i.seq is prompt] == [15]


def test_an_overdue_prompt_takes_what_the_microbatch_has_left():
    sched, prompt = adaptive_with_a_stream(time.monotonic() - 1e6, (100.0, 1.0, 10.0))
    assert [i.num_new for i in sched.schedule() if i.seq is prompt] == [64 - 1]


def test_each_returned_microbatch_feeds_the_cost_fit():
    """With the adaptive budget on (a fixed cap has no fit to feed)."""
    sched = Scheduler(SchedulerLimits(8, 64, True, adaptive_prefill=True), BlockManager(64, 16))
    stream, prompt, last_chunk = make_seq(4), make_seq(50), make_seq(30)
    batch = [ScheduledSeq(stream, 9, 1, True, 0), ScheduledSeq(prompt, 0, 20, False, 0),
             ScheduledSeq(last_chunk, 25, 5, True, 0)]
    sched.observe_cost(batch, 0.5)
    fit = sched.prompt_budget.fit
    assert (fit.with_prompts, fit.without_prompts) == (1, 0)
    assert fit.xtx[1:, 1:].tolist() == [[1.0, 25.0], [25.0, 625.0]]  # one decode, 25 prompt tokens
    assert fit.xty.tolist() == [0.5, 0.5, 12.5]
    sched.observe_cost(batch[:1], 0.1)
    assert (fit.with_prompts, fit.without_prompts) == (1, 1)


def test_a_few_ready_decodes_wait_for_their_share_while_others_are_in_flight():
    sched = Scheduler(SchedulerLimits(8, 64, True, decode_groups=1), BlockManager(64, 16))
    seqs = [make_seq(4) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()  # four prompts, each sampling
    for item in first[:1]:
        complete(item)  # one returns early
    assert sched.schedule(in_flight=1) == []  # one decode alone would re-read every weight
    assert [i.seq for i in sched.schedule(in_flight=0)] == seqs[:1]  # nothing out: go anyway


def test_uneven_decode_groups_both_stay_in_flight():
    sched = Scheduler(SchedulerLimits(8, 64, True, decode_groups=2), BlockManager(64, 16))
    seqs = [make_seq(4) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    run_step(sched)  # five decoding: groups of three and two
    first = sched.schedule()
    assert len(first) == 3
    second = sched.schedule(in_flight=1)  # the group of two goes without waiting for the three
    assert [i.seq for i in second] == seqs[3:]
    for item in first:
        complete(item)
    assert len(sched.schedule(in_flight=1)) == 3



def test_few_decodes_go_in_one_microbatch_when_it_may_run_alone_on_every_core():
    sched = Scheduler(SchedulerLimits(64, 64, True, decode_groups=2, solo_decodes=4), BlockManager(256, 16))
    seqs = [make_seq(4) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    assert len(sched.schedule()) == 4  # four decoding: one group
    assert sched.schedule(in_flight=1) == []
    more = [make_seq(4) for _ in range(2)]
    for s in more:
        sched.add(s)
    run_step(sched)  # the two prompts (the four are still in flight)
    for s in seqs:
        s.num_computed, s.awaiting_sample = s.num_scheduled, False
        s.output_token_ids.append(7)
    assert len(sched.schedule()) == 3  # six decoding, more than solo_decodes: two groups again


def test_preempt_all_requeues_every_running_sequence_ahead_of_the_waiting_in_order():
    """A live move of the split: every running sequence re-prefills on the new stages, in the
    order it ran, before any request that was still waiting."""
    blocks = BlockManager(16, 4, enable_caching=False)
    sched = Scheduler(SchedulerLimits(2, 64, True), blocks)
    a, b, c = make_seq(8), make_seq(6), make_seq(5)
    sched.add(a), sched.add(b), sched.add(c)
    run_step(sched)
    run_step(sched)  # a and b decoding, c waiting (max_num_seqs 2)
    assert sched.running == [a, b] and blocks.num_used > 0
    assert sched.preempt_all() == 2
    assert list(sched.waiting) == [a, b, c] and sched.running == [] and blocks.num_used == 0
    assert all(s.status is SeqStatus.WAITING and s.num_computed == 0 and s.epoch == 1 for s in (a, b))
    assert len(a.output_token_ids) == 2  # its tokens are kept: the prompt and them are recomputed
    assert [s.seq for s in run_step(sched)] == [a, b]
