"""The automatic split as a pure function of a timing table (core/partition_choice.py): fake
tables, no model, no clock."""
from __future__ import annotations

import itertools
import random

import pytest

from asyncpp.core.partition_choice import TrafficMix, choose_partition, mix_cost, stage_costs
from asyncpp.core.stage_profile import EMBEDDING, HEAD, STAGE, PieceTimes, TimingTable
from asyncpp.core.stages import SPLIT_GAIN, from_halves

DECODE = TrafficMix(prompt_tokens=0.0, output_tokens=1.0)
PREFILL = TrafficMix(prompt_tokens=1.0, output_tokens=0.0)


def table(attention: list[tuple[float, float]], mlp: list[tuple[float, float]], head=(0.0, 0.0),
          embedding=(0.0, 0.0), stage=(0.0, 0.0), weights: dict[str, int] | None = None) -> TimingTable:
    """Every half layer its own piece ("a3": layer 3's attention, "m3": its MLP), (decode, prefill)
    seconds each; one sequence and one prompt token timed, so the mix's weights are the times'."""
    weights = weights or {}
    named = {**{f"a{i}": t for i, t in enumerate(attention)}, **{f"m{i}": t for i, t in enumerate(mlp)},
             HEAD: head, EMBEDDING: embedding, STAGE: stage}
    pieces = {k: PieceTimes(d, p, weights.get(k, 0)) for k, (d, p) in named.items()}
    return TimingTable(pieces, tuple(f"a{i}" for i in range(len(attention))),
                       tuple(f"m{i}" for i in range(len(mlp))), decode_seqs=1, decode_context=256,
                       prefill_tokens=1, threads=1)


def uniform(layers: int, attention=(1.0, 1.0), mlp=(1.0, 1.0), **kw) -> TimingTable:
    return table([attention] * layers, [mlp] * layers, **kw)


def test_uniform_layers_and_a_light_head_split_evenly():
    assert choose_partition(uniform(8), 2).parts == [4, 4]
    assert choose_partition(uniform(9), 3).parts == [3, 3, 3]


def test_a_heavy_lm_head_takes_layers_off_the_last_stage():
    """8 layers of 2 units and a head of 4 in decode: 5 + 3 layers give 10 and 10."""
    choice = choose_partition(uniform(8, head=(4.0, 0.0)), 2, DECODE)
    assert choice.parts == [5, 3]
    assert choice.decode_s == [10.0, 10.0]


def test_a_half_layer_is_taken_when_it_lowers_the_slowest_stage_by_more_than_the_gain():
    """Attention 1, MLP 2, head 1.5: whole layers give 12 / 13.5 at best; ending the first
    stage after layer 4's attention gives 13 / 12.5 (3.7% better)."""
    choice = choose_partition(uniform(8, attention=(1.0, 0.0), mlp=(2.0, 0.0), head=(1.5, 0.0)), 2, DECODE)
    assert choice.parts == [4.5, 3.5] and choice.decode_s == [13.0, 12.5]


def test_whole_layers_stay_when_a_split_gains_less():
    """Attention 0.1, MLP 1.9, head 1.9: 4 + 4 give 8 / 9.9; 4.5 + 3.5 would give 8.1 / 9.8 (1%)."""
    table_ = uniform(8, attention=(0.1, 0.0), mlp=(1.9, 0.0), head=(1.9, 0.0))
    assert choose_partition(table_, 2, DECODE).parts == [4, 4]


def test_moe_layers_weigh_more_than_the_dense_one():
    """Layer 0 dense (MLP 1), layers 1-3 MoE (MLP 5), attention 1 each: 2 + 2 layers would give
    8 / 12; ending the first stage after layer 2's attention gives 9 / 11."""
    moe = table([(1.0, 0.0)] * 4, [(1.0, 0.0)] + [(5.0, 0.0)] * 3)
    assert choose_partition(moe, 2, DECODE).parts == [2.5, 1.5]
    assert choose_partition(uniform(4), 2, DECODE).parts == [2, 2]  # the same layers, all dense


def test_the_mix_decides_between_decode_and_prefill_balance():
    """The head costs 4 layers' halves in decode and nothing in a prompt chunk (one row of logits)."""
    table_ = uniform(8, head=(4.0, 0.0))
    assert choose_partition(table_, 2, DECODE).parts == [5, 3]
    assert choose_partition(table_, 2, PREFILL).parts == [4, 4]
    both = choose_partition(table_, 2, TrafficMix(1.0, 1.0))  # 4 units of head against 16 + 16 of layers
    assert both.parts == [4.5, 3.5]


def test_what_every_stage_pays_does_not_move_the_choice_but_is_predicted():
    with_overhead = choose_partition(uniform(8, head=(4.0, 0.0), stage=(3.0, 0.0)), 2, DECODE)
    assert with_overhead.parts == [5, 3] and with_overhead.decode_s == [13.0, 13.0]


def test_each_stage_stays_within_its_memory():
    """A head of 10 units of weights and layers of 2: with 14 a stage, the last stage holds 2
    layers at most, though its time would take 4."""
    weights = {HEAD: 10, **{f"a{i}": 1 for i in range(8)}, **{f"m{i}": 1 for i in range(8)}}
    table_ = uniform(8, weights=weights)
    assert choose_partition(table_, 2).parts == [4, 4]
    limited = choose_partition(table_, 2, capacity=14)
    assert limited.parts == [6, 2] and limited.fits_memory
    unfit = choose_partition(table_, 2, capacity=5)  # nothing fits: by time alone, and said so
    assert unfit.parts == [4, 4] and not unfit.fits_memory


def test_a_split_layer_when_only_it_fits():
    """An embedding and a head of 3 units of weights, halves of 1, 6 a stage: 1 + 2 or 2 + 1
    layers put 7 on one stage; 1.5 + 1.5 put 6 on each, though time alone would take 2 + 1."""
    weights = {HEAD: 3, EMBEDDING: 3, **{f"a{i}": 1 for i in range(3)}, **{f"m{i}": 1 for i in range(3)}}
    table_ = uniform(3, head=(4.0, 0.0), weights=weights)
    assert choose_partition(table_, 2).parts == [2, 1]
    choice = choose_partition(table_, 2, capacity=6)
    assert choice.parts == [1.5, 1.5] and choice.fits_memory


def test_the_choice_is_a_function_of_the_table():
    rng = random.Random(7)
    table_ = table([(rng.uniform(1, 3), rng.uniform(2, 6)) for _ in range(12)],
                   [(rng.uniform(1, 3), rng.uniform(2, 6)) for _ in range(12)], head=(6.0, 1.0))
    first = choose_partition(table_, 3)
    assert choose_partition(table_, 3) == first
    assert choose_partition(TimingTable.from_json(table_.to_json()), 3) == first


@pytest.mark.parametrize("seed", range(6))
def test_the_slowest_stage_is_the_least_any_split_gives(seed):
    """Against every split of 7 layers over 2 and 3 stages (boundaries on half layers): the
    choice is the best, or a whole-layer one within SPLIT_GAIN of it."""
    rng = random.Random(seed)
    table_ = table([(rng.uniform(0.5, 3), rng.uniform(0.5, 3)) for _ in range(7)],
                   [(rng.uniform(0.5, 3), rng.uniform(0.5, 3)) for _ in range(7)],
                   head=(rng.uniform(0, 8), rng.uniform(0, 1)), embedding=(rng.uniform(0, 1), rng.uniform(0, 1)))
    costs = stage_costs(table_, lambda p: mix_cost(p, table_, TrafficMix()))
    for pp in (2, 3):
        best = min(max(costs.of(parts)) for parts in _every_split(7, pp))
        chosen = max(costs.of(choose_partition(table_, pp).parts))
        assert best <= chosen <= best / (1 - SPLIT_GAIN) + 1e-9


def test_a_stage_per_layer_at_most():
    assert choose_partition(uniform(3), 1).parts == [3]
    with pytest.raises(ValueError, match="every stage needs a layer"):
        choose_partition(uniform(3), 4)


def _every_split(layers: int, pp: int):
    """Each partition in halves, every stage at least a layer's two halves."""
    n = 2 * layers
    for cuts in itertools.combinations(range(2, n - 1), pp - 1):
        bounds = [0, *cuts, n]
        halves = [b - a for a, b in zip(bounds, bounds[1:])]
        if min(halves) >= 2:
            yield from_halves(halves)
