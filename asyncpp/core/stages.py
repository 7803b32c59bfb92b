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


@dataclass(frozen=True, slots=True)
class StageCosts:
    """What a stage runs, in one unit (bytes moved per decode step, see ModelShape.stage_costs)."""
    layer: float  # each decoder layer
    first: float  # the first stage's extra work (the embedding)
    last: float  # the last stage's extra work (final norm, LM head, sampler)

    def of(self, parts: list[int]) -> list[float]:
        """Each stage's cost under a partition."""
        return [n * self.layer + (self.first if i == 0 else 0.0) + (self.last if i == len(parts) - 1 else 0.0)
                for i, n in enumerate(parts)]


def partition_layers(num_layers: int, pp_size: int, explicit: str | list[int] | None = None,
                     costs: StageCosts | None = None) -> list[int]:
    """Layer counts per stage: `explicit` when given, else balanced by `costs` (the
    largest stage cost as small as it can be), else even."""
    if pp_size < 1:
        raise ValueError(f"pipeline_parallel_size must be >= 1, got {pp_size}")
    if pp_size > num_layers:
        raise ValueError(
            f"pipeline_parallel_size ({pp_size}) is larger than the model's layer count "
            f"({num_layers}): every stage needs at least one layer")
    if explicit:
        return _checked(parse_partition(explicit), num_layers, pp_size)
    return balanced_partition(num_layers, pp_size, costs or StageCosts(1.0, 0.0, 0.0))


def _checked(parts: list[int], num_layers: int, pp_size: int) -> list[int]:
    if len(parts) != pp_size:
        raise ValueError(f"pp_layer_partition {parts} has {len(parts)} entries but "
                         f"pipeline_parallel_size is {pp_size}")
    if sum(parts) != num_layers:
        raise ValueError(f"pp_layer_partition {parts} sums to {sum(parts)} but the model "
                         f"has {num_layers} layers")
    if min(parts) < 1:
        raise ValueError(f"pp_layer_partition {parts}: every stage needs at least one layer")
    return parts


def balanced_partition(num_layers: int, pp_size: int, costs: StageCosts) -> list[int]:
    """The smallest largest-stage cost: find the least target every stage can keep under
    while holding all layers, fill each stage up to it, then take surplus layers back from
    the costliest stages (the first such on a tie)."""
    extras = costs.of([0] * pp_size)
    targets = sorted({n * costs.layer + e for e in extras for n in range(1, num_layers + 1)})
    for target in targets:
        caps = [int((target - e) / costs.layer + 1e-9) for e in extras]
        if min(caps) >= 1 and sum(caps) >= num_layers:
            break
    parts = [max(1, c) for c in caps]
    for _ in range(sum(parts) - num_layers):
        stage_costs = costs.of(parts)
        i = max((i for i in range(pp_size) if parts[i] > 1), key=lambda i: stage_costs[i])
        parts[i] -= 1
    return parts


def layer_ranges(parts: list[int]) -> list[tuple[int, int]]:
    ranges, start = [], 0
    for n in parts:
        ranges.append((start, start + n))
        start += n
    return ranges
