"""How far each reduced-precision row's greedy tokens follow the fp32 ones on the same prompts:
the share of requests whose first token agrees (a prefill's top-1) and the mean number of
tokens before the first difference (a random model's flat logits make later tokens part
quickly once one differs, so this understates a trained model's agreement)."""
from __future__ import annotations

from asyncpp.bench import SystemResult


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement_lines(results: list[SystemResult]) -> list[str]:
    ok = [r for r in results if r.ok and r.token_ids]
    reference = next((r for r in ok if r.kind == "asyncpp" and r.precision in ("", "fp32")), None)
    if reference is None:
        return []
    lines = []
    for r in ok:
        if r.precision in ("", "fp32"):
            continue
        pairs = list(zip(r.token_ids, reference.token_ids))
        first = sum(a[:1] == b[:1] for a, b in pairs) / len(pairs)
        prefix = sum(_common_prefix(a, b) for a, b in pairs) / len(pairs)
        lines.append(f"quality {r.name} vs {reference.name}: first token {first:.0%} of requests, "
                     f"{prefix:.1f} tokens before the first difference (mean)")
    return lines
