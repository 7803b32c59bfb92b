"""The automatic layer partition: from a measured TimingTable, the split whose slowest stage is
as fast as it can be for an expected mix of traffic, within each stage's memory. A pure
function of the table, so the same profile always gives the same split."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from asyncpp.core.stage_profile import EMBEDDING, HEAD, STAGE, PieceTimes, TimingTable
from asyncpp.core.stages import StageCosts, StageLimit, cheapest_partition


@dataclass(frozen=True, slots=True)
class TrafficMix:
    """Prompt tokens and generated tokens, in proportion."""
    prompt_tokens: float = 1.0
    output_tokens: float = 1.0


# A pipeline's throughput is its busiest stage's work, so a stage's cost is its time per
# request: each generated token is a share of a decode step, each prompt token a share of a
# prefill chunk. The default is a chat turn, a prompt about as long as its answer (the bench's
# workload W: prompts of 64..256 tokens, 128 generated). Decode weighs most of the time then:
# on a CPU a prompt token in a chunk costs about half a decode step's token.
DEFAULT_MIX = TrafficMix(prompt_tokens=1.0, output_tokens=1.0)


@dataclass(frozen=True, slots=True)
class PartitionChoice:
    parts: list[float]
    decode_s: list[float]  # each stage's predicted time for the profile's decode step
    prefill_s: list[float]  # and for its prefill chunk
    fits_memory: bool = True  # False: no split fits every stage's memory, and this one ignores it


def choose_partition(table: TimingTable, pp_size: int, mix: TrafficMix = DEFAULT_MIX,
                     capacity: float | None = None) -> PartitionChoice:
    """The split with the least costliest stage under `mix`, every stage's weights within
    `capacity` bytes (None: no limit). Every stage pays the STAGE piece, so it does not
    move the choice."""
    if not 1 <= pp_size <= table.num_layers:
        raise ValueError(f"{pp_size} stages for {table.num_layers} layers: every stage needs a layer")
    costs = stage_costs(table, lambda p: mix_cost(p, table, mix))
    limit = None if capacity is None else StageLimit(stage_costs(table, lambda p: float(p.weight_bytes)), capacity)
    fits = True
    try:
        parts = cheapest_partition(table.num_layers, pp_size, costs, limit)
    except ValueError:
        parts, fits = cheapest_partition(table.num_layers, pp_size, costs), False
    return PartitionChoice(parts, stage_seconds(table, parts, lambda p: p.decode),
                           stage_seconds(table, parts, lambda p: p.prefill), fits)


def mix_cost(piece: PieceTimes, table: TimingTable, mix: TrafficMix) -> float:
    """Seconds the piece adds to `mix`'s tokens: a decode step's share per generated token,
    a prefill chunk's per prompt token."""
    return (mix.output_tokens * piece.decode / table.decode_seqs
            + mix.prompt_tokens * piece.prefill / table.prefill_tokens)


def stage_costs(table: TimingTable, weigh: Callable[[PieceTimes], float]) -> StageCosts:
    """The table as StageCosts, each piece weighed by `weigh`."""
    attention = tuple(weigh(table.pieces[k]) for k in table.attention)
    mlp = tuple(weigh(table.pieces[k]) for k in table.mlp)
    return StageCosts(attention[0], mlp[0], weigh(table.pieces[EMBEDDING]), weigh(table.pieces[HEAD]),
                      layer_mlp=mlp, layer_attention=attention)


def stage_seconds(table: TimingTable, parts: list[float], weigh: Callable[[PieceTimes], float]) -> list[float]:
    """Each stage's predicted time under a partition: its pieces and what every stage pays."""
    overhead = weigh(table.pieces[STAGE])
    return [overhead + c for c in stage_costs(table, weigh).of(parts)]
