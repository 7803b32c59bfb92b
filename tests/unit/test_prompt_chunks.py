"""Equal-cost prompt chunks at P > 1 while nothing decodes (engine/prompt_chunks.py)."""
from test_scheduler import make_seq, run_step

from asyncpp.core.config import ModelShape
from asyncpp.engine.block_manager import BlockManager
from asyncpp.engine.prompt_chunks import attention_share, equal_cost_chunk
from asyncpp.engine.scheduler import Scheduler, SchedulerLimits

W = ModelShape(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1376,
               vocab_size=32000, max_positions=2048, gated_mlp=True)


def cost(n: int, start: int, share: float) -> float:
    return n * (1 + share * (start + n / 2))


def test_attention_share_counts_the_layer_work_per_token():
    # W: 2 * 512 per earlier position against 512 * 2048 (q, k, v, o) + 3 * 512 * 1376 (the MLP)
    assert attention_share(W) == 2 * 512 / (512 * 2048 + 3 * 512 * 1376)
    moe = ModelShape(8, 512, 8, 8, 64, 1376, 32000, 2048, True, num_experts=16, experts_per_token=2,
                     expert_intermediate_size=512, moe_layers=tuple(range(8)))
    assert attention_share(moe) == 2 * 512 / (512 * 2048 + 3 * 512 * 1024)  # the two active experts


def test_chunks_cost_what_a_budget_long_chunk_costs_at_the_start():
    share = 3.2e-4
    assert equal_cost_chunk(0, 256, share) == 256
    target = cost(256, 0, share)
    start, sizes = 0, []
    while start < 2000:
        n = min(2000 - start, equal_cost_chunk(start, 256, share))
        assert cost(n, start, share) <= target * 1.0001
        if start + n < 2000:
            assert cost(n + 1, start, share) > target  # the longest that fits the cost
        sizes.append(n)
        start += n
    assert sizes[0] == 256 and sizes == sorted(sizes, reverse=True) and sizes[-2] < 180
    assert equal_cost_chunk(10**6, 256, share) >= 1
    assert equal_cost_chunk(500, 256, 0.0) == 256  # no attention share: budget-long chunks


def test_a_lone_prompt_at_p2_shrinks_its_chunks_and_a_decoding_stream_stops_that():
    share = 0.01  # a large share, so the shrinking shows at small sizes
    limits = SchedulerLimits(8, 64, True, prefill_while_decoding=8, chunk_attention_share=share)
    sched = Scheduler(limits, BlockManager(256, 16))
    a = make_seq(200)
    sched.add(a)
    sizes: list[int] = []
    while a.num_computed < 200:
        sizes += [item.num_new for item in run_step(sched)]
    assert sizes[0] == 64 and sizes[1] == equal_cost_chunk(64, 64, share) < 64 and sum(sizes) == 200
    b = make_seq(200)
    sched.add(b)  # a decodes now: b's chunks are the fixed share while streams decode
    assert [(i.seq, i.num_new) for i in sched.schedule()] == [(a, 1), (b, 8)]
    off = Scheduler(SchedulerLimits(8, 64, True), BlockManager(256, 16))
    c = make_seq(200)
    off.add(c)
    run_step(off)
    assert [i.num_new for i in run_step(off)] == [64]  # P = 1 (no share): budget-long chunks
