"""Read exactly the tensors (and tensor slices) one rank owns from a safetensors checkpoint."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from asyncpp.model import mxfp4
from asyncpp.model.progress import progress


@dataclass(frozen=True, slots=True)
class TensorSlice:
    """`name[start:stop]` along `dim` (the whole tensor when dim is None), then maybe transposed.
    `expert`: first take this index of the leading dimension (one expert of a fused [experts, ...]
    tensor); `dim` then counts the dimensions that remain. `mxfp4`: `name` is the `_blocks` half
    of an MXFP4 weight (mxfp4.py), read with its `_scales` and dequantized to float32; a column
    slice reads the 32-value groups that cover it."""
    name: str
    dim: int | None = None
    start: int = 0
    stop: int | None = None
    transpose: bool = False
    expert: int | None = None
    mxfp4: bool = False


@dataclass(slots=True)
class WeightSource:
    """Where one parameter comes from: its slices concatenated along dim 0.

    `pad_rows`: the parameter may have more rows than the checkpoint gives (a vocab padded
    to a multiple of the TP size); the extra rows are zero.
    """
    slices: list[TensorSlice]
    pad_rows: bool = False
    fallback: WeightSource | None = None  # another checkpoint layout, read when this one's tensors are absent


WeightPlan = dict[str, WeightSource]


def whole(name: str) -> WeightSource:
    return WeightSource([TensorSlice(name)])


def rows(name: str, start: int, stop: int, transpose: bool = False) -> TensorSlice:
    return TensorSlice(name, 0, start, stop, transpose)


def cols(name: str, start: int, stop: int, transpose: bool = False) -> TensorSlice:
    return TensorSlice(name, 1, start, stop, transpose)


@dataclass(slots=True)
class Checkpoint:
    """Which file of a Hugging Face folder holds each tensor (headers only; nothing is read)."""
    path: Path
    files: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        ckpt = cls(Path(path))
        paths = sorted(ckpt.path.glob("*.safetensors"))
        if not paths:
            raise ValueError(f"no *.safetensors files in {ckpt.path}")
        for file in paths:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    ckpt.files[name] = file
        return ckpt

    def has(self, name: str) -> bool:
        return name in self.files


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, plan: WeightPlan, *,
                 desc: str = "loading weights", position: int = 0) -> None:
    """Fill every parameter of `model` from `plan`; each file is opened once, lazily.
    A slow load shows its progress in bytes (`desc`, `position`: see model/progress.py)."""
    params = dict(model.named_parameters())
    missing = set(params) - set(plan)
    if missing:
        raise ValueError(f"no checkpoint source for parameters {sorted(missing)}")
    total = sum(_nbytes(params[name]) for name in plan)
    with ExitStack() as stack, torch.no_grad(), progress(desc, total, unit="B", position=position) as shown:
        handles: dict[Path, object] = {}

        def view(name: str):  # a safetensors slice handle
            if name not in ckpt.files:
                raise ValueError(f"tensor {name!r} not found in checkpoint {ckpt.path}")
            file = ckpt.files[name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            return handles[file].get_slice(name)

        def read(sl: TensorSlice) -> torch.Tensor:
            t = _read_mxfp4(sl, view) if sl.mxfp4 else _read(sl, view(sl.name))
            return t.t() if sl.transpose else t

        for name, source in plan.items():
            source = _present(source, ckpt)
            _fill(name, params[name], [read(sl) for sl in source.slices], source.pad_rows)
            shown.update(_nbytes(params[name]))


def _read(sl: TensorSlice, view) -> torch.Tensor:
    if sl.dim is None and sl.expert is None:
        return view[:]
    index: list[int | slice] = [slice(None)] * len(view.get_shape())
    lead = 0 if sl.expert is None else 1
    if sl.expert is not None:
        index[0] = sl.expert
    if sl.dim is not None:
        index[lead + sl.dim] = slice(sl.start, sl.stop)
    return view[tuple(index)]


def _read_mxfp4(sl: TensorSlice, view) -> torch.Tensor:
    """Rows as asked; columns by whole 32-value groups, dequantized, then cut to the slice."""
    blocks, scales = view(sl.name), view(sl.name.removesuffix("_blocks") + "_scales")
    lead: list[int | slice] = [] if sl.expert is None else [sl.expert]
    rows, first, cut = slice(None), 0, slice(None)
    if sl.dim == 0:
        rows = slice(sl.start, sl.stop)
    elif sl.dim == 1:
        stop = sl.stop if sl.stop is not None else blocks.get_shape()[-2] * mxfp4.GROUP
        first = sl.start // mxfp4.GROUP
        cut = slice(sl.start - first * mxfp4.GROUP, stop - first * mxfp4.GROUP)
    groups = slice(first, None if sl.dim != 1 else -(-stop // mxfp4.GROUP))
    return mxfp4.dequantize(blocks[(*lead, rows, groups)], scales[(*lead, rows, groups)])[:, cut]


def _present(source: WeightSource, ckpt: Checkpoint) -> WeightSource:
    """The first layout whose tensors the checkpoint has (the last one otherwise, to name what is missing)."""
    while source.fallback is not None and not all(ckpt.has(sl.name) for sl in source.slices):
        source = source.fallback
    return source


def _nbytes(param: torch.Tensor) -> int:
    return param.numel() * param.element_size()


def _fill(name: str, param: torch.Tensor, parts: list[torch.Tensor], pad_rows: bool) -> None:
    value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    rows_ok = value.shape[0] == param.shape[0] or (pad_rows and value.shape[0] < param.shape[0])
    if value.shape[1:] != param.shape[1:] or not rows_ok:
        raise ValueError(f"checkpoint shape {tuple(value.shape)} does not fit parameter {name} "
                         f"{tuple(param.shape)}")
    param[: value.shape[0]].copy_(value)
    if value.shape[0] < param.shape[0]:
        param[value.shape[0]:].zero_()
