"""The compiled CPU kernels (csrc/, built by the package's install into asyncpp/_kernels.so).

Where they are missing (no compiler at install time, an isolated build, another CPU) or
`ASYNCPP_NO_KERNELS=1` turns them off, the engine runs its torch-op paths and says so once.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("asyncpp")


@functools.cache
def available() -> bool:
    """Whether torch.ops.asyncpp.* is loaded (once per process)."""
    if os.environ.get("ASYNCPP_NO_KERNELS", "") not in ("", "0"):
        return False
    try:
        importlib.import_module("asyncpp._kernels")  # registers torch.ops.asyncpp.*
    except ModuleNotFoundError:
        log.info("compiled kernels not built (no C++ compiler at install?): attention and small ops run on torch ops")
        return False
    except ImportError as exc:
        log.warning("compiled kernels do not load (%s): attention and small ops run on torch ops", exc)
        return False
    return True


def isa() -> str | None:
    """The instruction set the kernels picked on this CPU (avx512, avx2, generic), or None."""
    return torch.ops.asyncpp.kernel_isa() if available() else None


def decode_kernel_fits(device: torch.device | str, block_size: int, head_dim: int) -> bool:
    return torch.device(device).type == "cpu" and block_size % 8 == 0 and head_dim % 8 == 0 and available()


def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
                           first_pos: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                           softcap: float = 0.0, fp8_table: torch.Tensor | None = None, fp8_kind: int = 0,
                           v_unit: float = 1.0) -> torch.Tensor:
    """q [seqs, heads, head_dim] -> [seqs, heads * head_dim]; each KV head is read once per step
    for all the query heads that share it. `fp8_kind` 2 (e4m3) or 3 (e5m2) with `fp8_table`
    (byte -> value / unit) reads an 8-bit cache."""
    return torch.ops.asyncpp.paged_decode_attention(q, key_cache, value_cache, block_tables, context_lens, first_pos,
                                                    sinks, fp8_table, scale, v_unit, softcap, fp8_kind)
