"""Which asyncpp layouts a bench run compares: pipeline stages, TP ranks, virtual engines."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_LAYOUTS = "p1 p2v2 p2v1"


@dataclass(slots=True, frozen=True)
class Layout:
    pp: int = 1
    tp: int = 1
    ve: int | None = None  # None: the engine's default (V = P)
    partition: str | None = None  # layers per stage, None: the engine's default (even)

    @property
    def name(self) -> str:
        parts = [f"P={self.pp}"]
        if self.tp != 1:
            parts.append(f"T={self.tp}")
        if self.ve is not None and self.pp > 1:
            parts.append(f"V={self.ve}")
        name = ",".join(parts)
        return f"{name} [{self.partition}]" if self.partition else name

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs = {"pipeline_parallel_size": self.pp, "tensor_parallel_size": self.tp,
                  "num_virtual_engines": self.ve}
        return {**kwargs, "pp_layer_partition": self.partition} if self.partition else kwargs


def parse_layout(text: str) -> Layout:
    """'p2v2', 'P=2,V=2', 't2', 'p2t2', 'p2v2@5,3' (explicit layers per stage) -> Layout;
    letters p, t, v each once, any order."""
    text, at, partition = text.partition("@")
    if at and not re.fullmatch(r"\d+(,\d+)*", partition):
        raise ValueError(f"layout partition {partition!r}: expected layers per stage, e.g. @5,3")
    spec = text.lower().replace("=", "").replace(",", "").replace(" ", "")
    pairs = re.findall(r"([ptv])(\d+)", spec)
    if not pairs or "".join(k + n for k, n in pairs) != spec or len({k for k, _ in pairs}) != len(pairs):
        raise ValueError(f"layout {text!r}: expected letters p, t, v with sizes, e.g. p1, p2v2, t2, p2t2")
    sizes = {k: int(n) for k, n in pairs}
    if any(n < 1 for n in sizes.values()):
        raise ValueError(f"layout {text!r}: sizes must be >= 1")
    return Layout(pp=sizes.get("p", 1), tp=sizes.get("t", 1), ve=sizes.get("v"), partition=partition or None)


def parse_layouts(text: str) -> list[Layout]:
    layouts = [parse_layout(t) for t in text.replace(";", " ").split()]
    if not layouts:
        raise ValueError("--layouts needs at least one layout")
    return layouts
