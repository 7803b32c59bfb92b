"""The greedy sanity check: every system must give the token ids of the first asyncpp
layout in fp32. Below fp32 no two systems need agree: a stage's thread count changes the
order its GEMMs sum in, and bf16 or int8 rounding can turn that into another token (how far
such rows follow fp32 is a quality figure, benchmarks/precision_quality.py).
"""
from __future__ import annotations

from asyncpp.bench.results import SystemResult

_SHOWN = 5  # differing requests listed per system
EXACT_PRECISIONS = ("", "fp32")  # precisions in which every system must give the same greedy tokens


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_parity(results: list[SystemResult], output_len: int) -> list[str]:
    """Human-readable problems; empty when every system (a peer on its subset) agrees."""
    ok = [r for r in results if r.ok]
    problems: list[str] = []
    for precision in dict.fromkeys(r.precision for r in ok):
        if precision not in EXACT_PRECISIONS:
            continue
        group = [r for r in ok if r.precision == precision]
        reference = next((r for r in group if r.kind == "asyncpp"), None)
        if reference is None:
            continue
        problems += [f"{reference.name}: request {i} produced {len(ids)} tokens, expected {output_len}"
                     for i, ids in enumerate(reference.token_ids) if len(ids) != output_len]
        for other in group:
            if other is not reference:
                problems += _differences(reference, other)
    return problems


def _differences(reference: SystemResult, other: SystemResult) -> list[str]:
    bad = [i for i, (a, b) in enumerate(zip(reference.token_ids, other.token_ids)) if a != b]
    lines = [f"{other.name} vs {reference.name}: request {i} differs from token "
             f"{_first_difference(reference.token_ids[i], other.token_ids[i])}" for i in bad[:_SHOWN]]
    if len(bad) > _SHOWN:
        lines.append(f"{other.name} vs {reference.name}: {len(bad) - _SHOWN} more requests differ")
    return lines
