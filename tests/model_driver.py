"""Drive ModelRunners by hand: a tiny block allocator and a greedy loop that mixes prefill
chunks of some sequences with decodes of others in the same microbatch."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asyncpp.config import EngineArgs, EngineConfig, create_engine_config
from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.worker.model_runner import ModelRunner

GREEDY = SamplingParams(temperature=0, ignore_eos=True)


def engine_config(model_dir: Path, **kwargs) -> EngineConfig:
    kwargs.setdefault("device", "cpu")
    args = EngineArgs(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", **kwargs)
    return create_engine_config(args)


@dataclass(slots=True)
class BlockAllocator:
    free: list[int]

    @classmethod
    def shuffled(cls, num_blocks: int, seed: int = 0) -> "BlockAllocator":
        blocks = list(range(num_blocks))
        random.Random(seed).shuffle(blocks)  # scattered blocks: no accidental contiguity
        return cls(blocks)

    def grow(self, table: list[int], num_tokens: int, block_size: int) -> None:
        while len(table) * block_size < num_tokens:
            table.append(self.free.pop())


@dataclass(slots=True)
class Seq:
    seq_id: int
    prompt: list[int]
    max_new: int
    computed: int = 0  # tokens whose K/V are in the cache
    output: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new

    def next_work(self, chunk: int) -> SeqWork:
        if self.computed < len(self.prompt):
            ids = self.prompt[self.computed:self.computed + chunk]
            ends_prompt = self.computed + len(ids) == len(self.prompt)
        else:
            ids, ends_prompt = [self.output[-1]], True
        sample = SampleSpec(GREEDY, None, len(self.output)) if ends_prompt else None
        return SeqWork(self.seq_id, ids, self.computed, self.table, sample)


def generate(runners: list[ModelRunner], prompts: list[list[int]], max_new: int, *, chunk: int = 64,
             admit_per_step: int = 2, ve_id: int = 0, seed: int = 0, use_sampler: bool = False
             ) -> list[list[int]]:
    """Greedy tokens, with sequences admitted a few per step (so prefill chunks and decodes
    share microbatches) and each microbatch's sequence order shuffled."""
    rng = random.Random(seed)
    block_size = runners[0].layout.block_size
    blocks = BlockAllocator.shuffled(_num_blocks(runners), seed)
    seqs = [Seq(i, p, max_new) for i, p in enumerate(prompts)]
    active: list[Seq] = []
    pending = list(seqs)
    while pending or active:
        active += [pending.pop(0) for _ in range(min(admit_per_step, len(pending)))]
        works = [s.next_work(chunk) for s in active]
        for s, w in zip(active, works):
            blocks.grow(s.table, w.start_pos + w.num_tokens, block_size)
        order = list(range(len(works)))
        rng.shuffle(order)
        mb = MicroBatch(ve_id, [works[i] for i in order])
        tokens = _run(runners, mb, use_sampler)
        sampled = iter(tokens)
        for i in order:
            s, w = active[i], works[i]
            s.computed += w.num_tokens
            if w.sample is not None:
                s.output.append(next(sampled))
        for s in [s for s in active if s.done]:
            blocks.free += s.table
            active.remove(s)
    return [s.output for s in seqs]


def _run(runners: list[ModelRunner], mb: MicroBatch, use_sampler: bool) -> list[int]:
    intermediate = None
    for runner in runners[:-1]:
        intermediate = runner.forward(mb, intermediate)
        intermediate = {k: v.clone() for k, v in intermediate.items()}  # as if sent over the wire
    if use_sampler:
        return runners[-1].execute(mb, intermediate).token_ids
    logits = runners[-1].forward(mb, intermediate)
    assert logits.dtype == torch.float32 and logits.shape[0] == mb.num_samples
    return logits.argmax(dim=-1).tolist()


def _num_blocks(runners: list[ModelRunner]) -> int:
    caches = runners[0].kv_caches[0]
    return caches[0][1].shape[0]


class GlooGroup:
    """A real TP group over the default gloo world, for the multi-process tests."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def all_reduce(self, t: torch.Tensor) -> None:
        torch.distributed.all_reduce(t)

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)


def tp_worker(rank: int, world: int, model_dir: str, pp: int, prompts: list[list[int]], max_new: int,
              rendezvous: str, result_file: str) -> None:
    """One TP rank: builds its shard of every pipeline stage and runs them all in order
    (the TP collectives happen in the same order on every rank)."""
    import json

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        config = engine_config(Path(model_dir), tensor_parallel_size=world, pipeline_parallel_size=pp,
                               distributed_executor_backend="mp")
        group = GlooGroup(rank, world)
        runners = [ModelRunner(config, s, group) for s in config.stages if s.tp_rank == rank]
        for r in runners:
            r.init_kv_cache(1, 400)
        tokens = generate(runners, prompts, max_new, chunk=64)
        sizes = [r.param_bytes() for r in runners]
        Path(f"{result_file}.{rank}").write_text(json.dumps({"tokens": tokens, "param_bytes": sizes}))
        torch.distributed.barrier()  # a peer tearing gloo down mid-collective aborts the other
    finally:
        torch.distributed.destroy_process_group()
