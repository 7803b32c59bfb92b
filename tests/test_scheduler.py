"""Scheduler and block manager, without a model."""
from asyncpp.engine.block_manager import BlockManager
from asyncpp.engine.scheduler import Scheduler, SchedulerLimits
from asyncpp.engine.sequence import Request, Sequence, SeqStatus
from asyncpp.core.outputs import RequestMetrics
from asyncpp.core.sampling_params import SamplingParams


def make_seq(prompt_len: int) -> Sequence:
    req = Request("r", None, list(range(prompt_len)), SamplingParams(), 16, RequestMetrics(0.0))
    seq = Sequence(req, 0, req.prompt_token_ids)
    req.seqs = [seq]
    return seq


def run_step(sched: Scheduler, token: int = 7) -> list:
    batch = sched.schedule()
    for item in batch:
        item_samples = item.samples
        item.seq.num_computed += item.num_new
        if item_samples:
            item.seq.output_token_ids.append(token)
    return batch


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
    assert blocks.num_used == 0 and not sched.has_work()


def test_max_num_seqs_caps_running():
    sched = Scheduler(SchedulerLimits(2, 256, True), BlockManager(64, 16))
    seqs = [make_seq(5) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    assert [s.seq for s in run_step(sched)] == seqs[:2]
    assert len(sched.waiting) == 1
