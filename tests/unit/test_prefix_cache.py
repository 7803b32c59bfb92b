"""Prefix caching in the block manager and the scheduler, without a model."""
from asyncpp.core.outputs import RequestMetrics
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine.block_manager import BlockManager
from asyncpp.engine.scheduler import Scheduler, SchedulerLimits
from asyncpp.engine.sequence import Request, Sequence

SHARED = list(range(100, 132))  # eight blocks of 4 tokens


def make_seq(tokens: list[int], salt: str | None = None, params: SamplingParams | None = None) -> Sequence:
    req = Request("r", None, tokens, params or SamplingParams(), 16, RequestMetrics(0.0), salt)
    seq = Sequence(req, 0, tokens)
    req.seqs = [seq]
    return seq


def caching_scheduler(num_blocks: int = 64, budget: int = 256) -> Scheduler:
    return Scheduler(SchedulerLimits(8, budget, True), BlockManager(num_blocks, 4, enable_caching=True))


def admit(sched: Scheduler, seq: Sequence) -> int:
    """Schedule seq's first chunk (left in flight); returns the position it starts at."""
    sched.add(seq)
    (item,) = [item for item in sched.schedule() if item.seq is seq]
    return item.start


def test_a_prefix_in_flight_is_shared_by_the_next_request():
    sched = caching_scheduler()
    a, b = make_seq(SHARED + [1, 2]), make_seq(SHARED + [3, 4, 5])
    assert admit(sched, a) == 0
    assert admit(sched, b) == 32  # a's chunk has not returned: stages run it first anyway
    assert b.block_table[:8] == a.block_table[:8]
    assert b.block_table[8] != a.block_table[8]
    assert (sched.blocks.counters.queries, sched.blocks.counters.hits) == (34 + 35, 32)


def test_a_whole_cached_prompt_still_computes_its_last_token():
    sched = caching_scheduler()
    admit(sched, make_seq(SHARED))
    again = make_seq(SHARED)
    assert admit(sched, again) == 28  # the last block is recomputed, not shared and rewritten
    assert again.num_scheduled == 32


def test_a_prompt_whose_logprobs_are_asked_for_is_computed_whole_until_they_are_known():
    sched = caching_scheduler()
    admit(sched, make_seq(SHARED + [1]))
    wanting = make_seq(SHARED + [1], params=SamplingParams(prompt_logprobs=0))
    assert admit(sched, wanting) == 0  # a cached block has no logits
    known = make_seq(SHARED + [1], params=SamplingParams(prompt_logprobs=0))
    known.request.prompt_logprobs_missing = 0  # e.g. preempted after its prompt ran
    assert admit(sched, known) == 32


def test_shorter_than_a_block_is_never_a_hit():
    sched = caching_scheduler()
    admit(sched, make_seq([7, 8, 9]))
    assert admit(sched, make_seq([7, 8, 9, 10])) == 0


def test_salts_keep_caches_apart():
    sched = caching_scheduler()
    admit(sched, make_seq(SHARED + [1], salt="tenant-a"))
    assert admit(sched, make_seq(SHARED + [1], salt="tenant-b")) == 0
    assert admit(sched, make_seq(SHARED + [1], salt="tenant-a")) == 32


def test_finished_blocks_stay_cached_until_needed_then_evicted_oldest_first():
    sched = caching_scheduler(num_blocks=12)
    blocks = sched.blocks
    a, b = make_seq(list(range(16)) + [0]), make_seq(list(range(50, 66)) + [0])  # 5 blocks each
    admit(sched, a), admit(sched, b)
    sched.remove(a)
    sched.remove(b)
    assert (blocks.num_used, blocks.num_cached_free) == (0, 8)  # the partial last blocks are not cached
    c = make_seq(list(range(200, 220)) + [0])  # 6 blocks: the 4 never cached, then 2 evicted
    admit(sched, c)
    assert blocks.num_cached_free == 6
    sched.remove(c)
    assert admit(sched, make_seq(list(range(50, 66)) + [1])) == 16  # b's prefix survived whole
    assert admit(sched, make_seq(list(range(16)) + [1])) == 8  # a's tail went first, its head is left


def test_nothing_is_held_after_everything_ends_and_a_reset_empties_the_cache():
    sched = caching_scheduler()
    seqs = [make_seq(SHARED + [i]) for i in range(3)]
    for seq in seqs:
        admit(sched, seq)
    for seq in seqs:
        sched.remove(seq)
    assert sched.blocks.num_used == 0 and sched.blocks.num_cached_free == 8
    assert sched.blocks.reset_cache() == 8
    assert sched.blocks.num_cached_free == 0 and sched.blocks.num_free == 64
    assert admit(sched, make_seq(SHARED + [9])) == 0


def test_uncached_blocks_are_not_shared():
    sched = caching_scheduler()
    a = make_seq(SHARED + [1])
    admit(sched, a)
    sched.blocks.uncache(set(a.block_table[2:]))
    assert admit(sched, make_seq(SHARED + [2])) == 8  # only the first two blocks remain


def test_off_means_no_hits_and_no_counts():
    sched = Scheduler(SchedulerLimits(8, 256, True), BlockManager(64, 4))
    admit(sched, make_seq(SHARED + [1]))
    assert admit(sched, make_seq(SHARED + [1])) == 0
    assert sched.blocks.counters.queries == 0 and sched.blocks.num_cached_free == 0


def test_prompts_in_one_microbatch_share_what_the_first_computes():
    sched = caching_scheduler()
    a, b = make_seq(SHARED + [1]), make_seq(SHARED + [2])
    sched.add(a), sched.add(b)
    assert [(item.seq, item.start) for item in sched.schedule()] == [(a, 0), (b, 32)]



def test_a_failed_chunk_of_an_aborted_request_suspects_only_blocks_still_its_own():
    """A chunk fails after its request was aborted: the blocks still keyed as the aborted
    request keyed them are suspect (later requests could share them); blocks reallocated to
    a newer request since are not (it rewrites them itself, after the failed chunk)."""
    sched = caching_scheduler(num_blocks=6)
    a = make_seq(SHARED[:12] + [1])  # three full blocks and a partial one
    admit(sched, a)
    table, epoch = list(a.block_table), a.epoch
    sched.remove(a)
    a.finish("abort")
    b = make_seq(list(range(50, 63)))  # four blocks: the two never used, a's partial, a's last full one
    admit(sched, b)
    assert set(b.block_table) == {table[2], table[3]} | (set(range(6)) - set(table))
    assert sched.blocks.written_by(a, epoch, table, 0, 13) == {table[0], table[1]}
    assert sched.blocks.written_by(b, b.epoch, list(b.block_table), 0, 13) == set(b.block_table)
