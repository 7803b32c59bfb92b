"""Each rank's place in the pipeline, and which layers each stage owns.

A partition gives each stage's layer count; x.5 means the stage boundary falls halfway
through a layer, after its attention: the attention (and its KV cache) stays on the
earlier stage, the MLP goes to the later one. Internally a partition is counted in
halves (attention, MLP, attention, ...).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# A split layer is taken only when it lowers the costliest stage by more than this
# fraction: the costs are an estimate, and whole layers are what users expect to see.
SPLIT_GAIN = 0.02


@dataclass(slots=True)
class StageSpec:
    """One rank's place in the world: rank = pp_rank * T + tp_rank (as vLLM)."""
    pp_rank: int
    pp_size: int
    tp_rank: int
    tp_size: int
    layer_start: int
    layer_end: int  # layers with any part here: a split layer counts on both of its stages
    mlp_only_first: bool = False  # the first layer's attention ran on the stage before
    attention_only_last: bool = False  # the last layer's MLP runs on the stage after

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

    @property
    def kv_layers(self) -> int:
        """Layers whose attention, and so whose KV cache, is on this stage."""
        return self.num_layers - int(self.mlp_only_first)

    def parts(self, i: int) -> tuple[bool, bool]:
        """(attention, MLP): which halves of local layer i run here."""
        return (not (i == 0 and self.mlp_only_first),
                not (i == self.num_layers - 1 and self.attention_only_last))


@dataclass(frozen=True, slots=True)
class LayerSpan:
    start: int
    end: int
    mlp_only_first: bool
    attention_only_last: bool


def parse_partition(text: str | Sequence[float]) -> list[float]:
    items = [str(x) for x in text] if not isinstance(text, str) else text.replace(" ", "").split(",")
    try:
        halves = [float(x) * 2 for x in items if x]
    except ValueError:
        raise ValueError(f"pp_layer_partition must be comma-separated layer counts, got {text!r}") from None
    if any(h != int(h) for h in halves):
        raise ValueError(f"pp_layer_partition {text!r}: a stage holds whole layers, or ends halfway "
                         "through one after its attention (x.5)")
    return from_halves([int(h) for h in halves])


def to_halves(parts: Sequence[float]) -> list[int]:
    return [round(2 * p) for p in parts]


def from_halves(halves: Sequence[int]) -> list[float]:
    return [h // 2 if h % 2 == 0 else h / 2 for h in halves]


def format_partition(parts: Sequence[float]) -> str:
    return ",".join(f"{p:g}" for p in parts)


def layer_spans(parts: Sequence[float]) -> list[LayerSpan]:
    """Each stage's layers: [start, end) with any part on the stage, and its split ends."""
    spans, start = [], 0
    for h in to_halves(parts):
        end = start + h
        spans.append(LayerSpan(start // 2, (end + 1) // 2, start % 2 == 1, end % 2 == 1))
        start = end
    return spans


def stage_specs(parts: Sequence[float], pp: int, tp: int) -> list[StageSpec]:
    """Every rank's place under a partition, by rank."""
    return [StageSpec(p, pp, t, tp, s.start, s.end, s.mlp_only_first, s.attention_only_last)
            for p, s in enumerate(layer_spans(parts)) for t in range(tp)]


@dataclass(frozen=True, slots=True)
class StageCosts:
    """What a stage runs, in one unit: bytes moved per decode step (ModelShape.stage_costs), seconds
    measured at start-up (core/partition_choice.py), or weight bytes for a memory limit."""
    attention: float  # each decoder layer's attention half, with its KV cache
    mlp: float  # each decoder layer's MLP half
    first: float  # the first stage's extra work (the embedding)
    last: float  # the last stage's extra work (final norm, LM head, sampler)
    layer_mlp: tuple[float, ...] = ()  # each layer's MLP half, where they differ (dense among MoE layers)
    layer_attention: tuple[float, ...] = ()  # each layer's attention half, where they differ (windowed or not)

    @property
    def per_layer(self) -> bool:
        return bool(self.layer_mlp or self.layer_attention)

    def of(self, parts: Sequence[float]) -> list[float]:
        """Each stage's cost under a partition."""
        costs, start = [], 0
        halves = to_halves(parts)
        for i, h in enumerate(halves):
            costs.append(self.span(start, start + h, i == 0, i == len(halves) - 1))
            start += h
        return costs

    def span(self, start: int, end: int, first: bool, last: bool) -> float:
        """Halves [start, end): the even ones are attention."""
        attentions = (end + 1) // 2 - (start + 1) // 2
        attention = (sum(self.layer_attention[(start + 1) // 2:(end + 1) // 2]) if self.layer_attention
                     else attentions * self.attention)
        mlps = (sum(self.layer_mlp[start // 2:end // 2]) if self.layer_mlp
                else (end - start - attentions) * self.mlp)
        return attention + mlps + (self.first if first else 0.0) + (self.last if last else 0.0)


@dataclass(frozen=True, slots=True)
class StageLimit:
    """What one stage may hold: each part's `size` (weight bytes, as StageCosts) within `capacity`."""
    size: StageCosts
    capacity: float

    def fits(self, start: int, end: int, first: bool, last: bool) -> bool:
        return self.size.span(start, end, first, last) <= self.capacity


def partition_layers(num_layers: int, pp_size: int, explicit: str | Sequence[float] | None = None,
                     costs: StageCosts | None = None) -> list[float]:
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
    if costs is None:
        return balanced_partition(num_layers, pp_size, StageCosts(1.0, 0.0, 0.0, 0.0))
    return cheapest_partition(num_layers, pp_size, costs)


def cheapest_partition(num_layers: int, pp_size: int, costs: StageCosts, limit: StageLimit | None = None
                       ) -> list[float]:
    """Whole layers per stage, or a stage boundary inside a layer when that lowers the costliest
    stage by more than SPLIT_GAIN; every stage within `limit` (ValueError when none fits)."""
    split = split_partition(num_layers, pp_size, costs, limit=limit)
    try:
        whole = (split_partition(num_layers, pp_size, costs, step=2, limit=limit) if costs.per_layer or limit
                 else balanced_partition(num_layers, pp_size, costs))
    except ValueError:  # only a split layer fits the limit
        return split
    return split if max(costs.of(split)) < (1 - SPLIT_GAIN) * max(costs.of(whole)) else whole


def _checked(parts: list[float], num_layers: int, pp_size: int) -> list[float]:
    if len(parts) != pp_size:
        raise ValueError(f"pp_layer_partition {parts} has {len(parts)} entries but "
                         f"pipeline_parallel_size is {pp_size}")
    if sum(parts) != num_layers:
        raise ValueError(f"pp_layer_partition {parts} sums to {sum(parts)} but the model "
                         f"has {num_layers} layers")
    if min(parts) < 1:
        raise ValueError(f"pp_layer_partition {parts}: every stage needs at least one layer")
    return parts


def balanced_partition(num_layers: int, pp_size: int, costs: StageCosts) -> list[float]:
    """The smallest largest-stage cost: find the least target every stage can keep under
    while holding all layers, fill each stage up to it, then take surplus layers back from
    the costliest stages (the first such on a tie)."""
    layer = costs.attention + costs.mlp
    extras = costs.of([0] * pp_size)
    targets = sorted({n * layer + e for e in extras for n in range(1, num_layers + 1)})
    for target in targets:
        caps = [int((target - e) / layer + 1e-9) for e in extras]
        if min(caps) >= 1 and sum(caps) >= num_layers:
            break
    parts = [max(1, c) for c in caps]
    for _ in range(sum(parts) - num_layers):
        stage_costs = costs.of(parts)
        i = max((i for i in range(pp_size) if parts[i] > 1), key=lambda i: stage_costs[i])
        parts[i] -= 1
    return list(parts)


def split_partition(num_layers: int, pp_size: int, costs: StageCosts, step: int = 1,
                    limit: StageLimit | None = None) -> list[float]:
    """The smallest largest-stage cost with stage boundaries on any half layer (`step` 2: on
    whole layers): bisect on the target, each stage greedily taking the halves that fit under it
    (and within `limit`: both grow with a stage's span, so greedy stays optimal)."""
    n = 2 * num_layers

    def fill(target: float) -> list[int] | None:
        halves, start = [], 0
        for stage in range(pp_size):
            end, last = start, stage == pp_size - 1
            while (end + step <= n - 2 * (pp_size - stage - 1)
                   and costs.span(start, end + step, stage == 0, last) <= target
                   and (limit is None or limit.fits(start, end + step, stage == 0, last))):
                end += step
            if end - start < 2:
                return None
            halves.append(end - start)
            start = end
        return halves if start == n else None

    low, high = 0.0, costs.span(0, n, True, True)  # no stage costs more than everything
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (low, mid) if fill(mid) else (mid, high)
    found = fill(high)
    if found is None:  # only a limit makes every split infeasible
        raise ValueError(f"no split of {num_layers} layers over {pp_size} stages fits each stage's memory")
    return from_halves(found)
