"""The start-up profile behind the automatic layer partition: what each piece of the model
costs, measured (asyncpp/worker/stage_profiler.py), and kept as JSON (asyncpp/profile_cache.py).

Identical layers are measured once per kind, so the table names each layer's kind of
attention half and of MLP half; the pieces every stage has or only the first and last have
are measured alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STAGE = "stage"  # what every stage pays whatever it holds (attention metadata, rotary tables)
EMBEDDING = "embedding"  # the first stage's extra piece
HEAD = "head"  # the last stage's: final norm, LM head, sampler


@dataclass(frozen=True, slots=True)
class PieceTimes:
    """One piece of the model: seconds for a decode step and for a prefill chunk (medians), and its weights."""
    decode: float
    prefill: float
    weight_bytes: int = 0


@dataclass(frozen=True, slots=True)
class TimingTable:
    pieces: dict[str, PieceTimes]  # STAGE, EMBEDDING, HEAD and each kind of half layer
    attention: tuple[str, ...]  # each layer's attention half: a kind in `pieces`
    mlp: tuple[str, ...]  # each layer's MLP (or MoE) half
    decode_seqs: int  # sequences in the timed decode step
    decode_context: int  # tokens of context each of them has
    prefill_tokens: int  # tokens of the timed prefill chunk (one prompt's first chunk)
    threads: int  # torch threads it ran on
    seconds: float = 0.0  # how long measuring took, building included
    device_bytes: int = 0  # memory of the GPU it ran on (0: host memory, which the stages share)

    def __post_init__(self) -> None:
        if len(self.attention) != len(self.mlp):
            raise ValueError(f"{len(self.attention)} attention halves but {len(self.mlp)} MLP halves")
        missing = {STAGE, EMBEDDING, HEAD, *self.attention, *self.mlp} - set(self.pieces)
        if missing:
            raise ValueError(f"timing table has no entry for {sorted(missing)}")

    @property
    def num_layers(self) -> int:
        return len(self.attention)

    def kinds(self) -> list[str]:
        """Every piece, in model order: stage, embedding, each kind of half as first met, head."""
        halves = [k for pair in zip(self.attention, self.mlp) for k in pair]
        return [STAGE, EMBEDDING, *dict.fromkeys(halves), HEAD]

    def to_json(self) -> dict[str, Any]:
        return {"pieces": {k: [p.decode, p.prefill, p.weight_bytes] for k, p in self.pieces.items()},
                "attention": list(self.attention), "mlp": list(self.mlp), "decode_seqs": self.decode_seqs,
                "decode_context": self.decode_context, "prefill_tokens": self.prefill_tokens,
                "threads": self.threads, "seconds": self.seconds, "device_bytes": self.device_bytes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TimingTable":
        pieces = {k: PieceTimes(float(d), float(p), int(b)) for k, (d, p, b) in data["pieces"].items()}
        return cls(pieces, tuple(data["attention"]), tuple(data["mlp"]), int(data["decode_seqs"]),
                   int(data["decode_context"]), int(data["prefill_tokens"]), int(data["threads"]),
                   float(data.get("seconds", 0.0)), int(data.get("device_bytes", 0)))

    def describe(self) -> list[str]:
        """One line per piece, for the log."""
        counts = {k: self.attention.count(k) + self.mlp.count(k) for k in self.pieces}
        lines = []
        for kind in self.kinds():
            p = self.pieces[kind]
            times = f"{counts[kind]} x " if counts[kind] else ""
            lines.append(f"{times}{kind}: decode {p.decode * 1e3:.2f} ms, prefill {p.prefill * 1e3:.2f} ms, "
                         f"weights {p.weight_bytes / 2**20:.1f} MiB")
        return lines
