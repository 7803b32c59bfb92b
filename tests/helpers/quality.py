"""Quality of a reduced-precision model: teacher-forced logits (every step fed the same
tokens, so one early difference cannot send the rest down another path) and top-1
agreement between two runs of them."""
from __future__ import annotations

from pathlib import Path

import torch

from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork
from asyncpp.worker.model_runner import ModelRunner
from helpers.driver import GREEDY, BlockAllocator


def forced_logits(runners: list[ModelRunner], prompts: list[list[int]], forced: list[list[int]],
                  chunk: int = 64) -> list[torch.Tensor]:
    """Per prompt, float32 logits [len(forced), vocab]: row j predicts forced[j], having been
    fed the prompt (in chunks of `chunk`, later chunks reading the cache) and forced[:j]
    (decode steps). All sequences share every microbatch."""
    blocks = BlockAllocator.shuffled(400, runners[0].layout.block_size)
    tables: list[list[int]] = [[] for _ in prompts]
    done = [0] * len(prompts)  # tokens in the cache
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    while any(len(r) < len(f) for r, f in zip(rows, forced)):
        work = []
        for i, (p, f) in enumerate(zip(prompts, forced)):
            if len(rows[i]) == len(f):
                continue
            stream = p + f
            ids = stream[done[i]:min(done[i] + chunk, len(p))] if done[i] < len(p) else [stream[done[i]]]
            blocks.grow(tables[i], done[i] + len(ids))
            ends = done[i] + len(ids) >= len(p)
            work.append((i, SeqWork(i, ids, done[i], list(tables[i]), SampleSpec(GREEDY, None, 0) if ends else None)))
        logits = _run(runners, MicroBatch(0, [w for _, w in work]))
        sampled = iter(logits)
        for i, w in work:
            done[i] += w.num_tokens
            if w.sample is not None:
                rows[i].append(next(sampled))
    return [torch.stack(r) for r in rows]


def _run(runners: list[ModelRunner], mb: MicroBatch) -> torch.Tensor:
    states = None
    for runner in runners[:-1]:
        states = {k: v.clone() for k, v in runner.forward(mb, states).items()}
    return runners[-1].forward(mb, states)


def top1_agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    same = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b))
    return same / sum(x.shape[0] for x in a)


def hf_forced_logits(model_dir: Path, prompts: list[list[int]], forced: list[list[int]],
                     dtype: torch.dtype) -> list[torch.Tensor]:
    """transformers in `dtype`, one forward pass per prompt + forced tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    out = []
    with torch.no_grad():
        for p, f in zip(prompts, forced):
            ids = torch.tensor([p + f[:-1]])
            out.append(model(ids).logits[0, len(p) - 1:].float())
    return out
