"""Each rank's place in the pipeline, and which layers each stage owns."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StageSpec:
    """One rank's place in the world: rank = pp_rank * T + tp_rank (as vLLM)."""
    pp_rank: int
    pp_size: int
    tp_rank: int
    tp_size: int
    layer_start: int
    layer_end: int

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start



def parse_partition(text: str | list[int] | tuple[int, ...]) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"pp_layer_partition must be comma-separated integers, got {text!r}") from None


def partition_layers(num_layers: int, pp_size: int, explicit: str | list[int] | None = None) -> list[int]:
    """Layer counts per stage.

    Even by default. A remainder goes to the middle stages (then the first), never to the
    last one, which also carries the final norm and the LM head.
    """
    if pp_size < 1:
        raise ValueError(f"pipeline_parallel_size must be >= 1, got {pp_size}")
    if pp_size > num_layers:
        raise ValueError(
            f"pipeline_parallel_size ({pp_size}) is larger than the model's layer count "
            f"({num_layers}): every stage needs at least one layer")
    if explicit:
        parts = parse_partition(explicit)
        if len(parts) != pp_size:
            raise ValueError(f"pp_layer_partition {parts} has {len(parts)} entries but "
                             f"pipeline_parallel_size is {pp_size}")
        if sum(parts) != num_layers:
            raise ValueError(f"pp_layer_partition {parts} sums to {sum(parts)} but the model "
                             f"has {num_layers} layers")
        if min(parts) < 1:
            raise ValueError(f"pp_layer_partition {parts}: every stage needs at least one layer")
        return parts
    base, rest = divmod(num_layers, pp_size)
    parts = [base] * pp_size
    receivers = list(range(1, pp_size - 1)) + [0] if pp_size > 2 else [0]
    for i in range(rest):
        parts[receivers[i % len(receivers)]] += 1
    return parts


def layer_ranges(parts: list[int]) -> list[tuple[int, int]]:
    ranges, start = [], 0
    for n in parts:
        ranges.append((start, start + n))
        start += n
    return ranges
