"""Which asyncpp layouts a bench run compares: pipeline stages, TP ranks, virtual engines,
and the precision each runs in (dtype, KV-cache dtype, weight quantization)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_LAYOUTS = "p1 p2v2 p2v1"
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_KV = {"kv8": "fp8", "kvfp8": "fp8", "kvfp8_e5m2": "fp8_e5m2"}
_QUANT = {"int8": "int8"}


@dataclass(slots=True, frozen=True)
class Precision:
    """None everywhere: the engine's (or the run's engine arguments') defaults."""
    dtype: str | None = None
    kv_cache_dtype: str | None = None
    quantization: str | None = None

    @property
    def label(self) -> str:
        """'' | 'bf16' | 'bf16 kv=fp8' | 'fp32 w=int8' ..."""
        short = {v: k for k, v in _DTYPES.items()}
        parts = [short[self.dtype]] if self.dtype else []
        parts += [f"kv={self.kv_cache_dtype}"] if self.kv_cache_dtype else []
        parts += [f"w={self.quantization}"] if self.quantization else []
        return " ".join(parts)

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs = {"dtype": self.dtype, "kv_cache_dtype": self.kv_cache_dtype, "quantization": self.quantization}
        return {k: v for k, v in kwargs.items() if v is not None}


def parse_precision(options: list[str]) -> Precision:
    """['bf16', 'kv8', 'int8'] -> Precision."""
    values: dict[str, str] = {}
    for option in options:
        key = ("dtype" if option in _DTYPES else "kv_cache_dtype" if option in _KV
               else "quantization" if option in _QUANT else None)
        if key is None or key in values:
            raise ValueError(f"layout option {option!r}: expected at most one each of "
                             f"{'|'.join(_DTYPES)}, {'|'.join(_KV)}, {'|'.join(_QUANT)}")
        values[key] = {**_DTYPES, **_KV, **_QUANT}[option]
    return Precision(**values)


@dataclass(slots=True, frozen=True)
class Layout:
    pp: int = 1
    tp: int = 1
    ve: int | None = None  # None: the engine's default (V = P)
    partition: str | None = None  # layers per stage, "auto" or "cost"; None: the engine's default (auto)
    precision: Precision = Precision()

    @property
    def name(self) -> str:
        parts = [f"P={self.pp}"]
        if self.tp != 1:
            parts.append(f"T={self.tp}")
        if self.ve is not None and self.pp > 1:
            parts.append(f"V={self.ve}")
        name = ",".join(parts)
        name = f"{name} [{self.partition}]" if self.partition else name
        return f"{name} {self.precision.label}".strip()

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs = {"pipeline_parallel_size": self.pp, "tensor_parallel_size": self.tp,
                  "num_virtual_engines": self.ve, **self.precision.engine_kwargs()}
        return {**kwargs, "pp_layer_partition": self.partition} if self.partition else kwargs


def parse_layout(text: str) -> Layout:
    """'p2v2', 'P=2,V=2', 't2', 'p2t2', 'p2v2@5,3' (explicit layers per stage; @auto, @cost: how the
    engine chooses them) -> Layout;
    letters p, t, v each once, any order. Precision options follow after '/':
    'p1/bf16', 'p2v2/bf16/kv8', 'p1/bf16/int8'."""
    text, *options = text.split("/")
    precision = parse_precision(options)
    text, at, partition = text.partition("@")
    if at and not re.fullmatch(r"auto|cost|\d+(\.5)?(,\d+(\.5)?)*", partition):
        raise ValueError(f"layout partition {partition!r}: expected layers per stage, e.g. @5,3, or @auto, @cost")
    spec = text.lower().replace("=", "").replace(",", "").replace(" ", "")
    pairs = re.findall(r"([ptv])(\d+)", spec)
    if not pairs or "".join(k + n for k, n in pairs) != spec or len({k for k, _ in pairs}) != len(pairs):
        raise ValueError(f"layout {text!r}: expected letters p, t, v with sizes, e.g. p1, p2v2, t2, p2t2")
    sizes = {k: int(n) for k, n in pairs}
    if any(n < 1 for n in sizes.values()):
        raise ValueError(f"layout {text!r}: sizes must be >= 1")
    return Layout(pp=sizes.get("p", 1), tp=sizes.get("t", 1), ve=sizes.get("v"), partition=partition or None,
                  precision=precision)


def parse_layouts(text: str) -> list[Layout]:
    layouts = [parse_layout(t) for t in text.replace(";", " ").split()]
    if not layouts:
        raise ValueError("--layouts needs at least one layout")
    return layouts
