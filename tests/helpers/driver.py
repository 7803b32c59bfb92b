"""Drive microbatches by hand, as a virtual engine would: a tiny block allocator and a
greedy loop that admits a few sequences per step (so prefill chunks and decodes share
microbatches) and shuffles each microbatch's order. It drives ModelRunners directly
(`generate`) or an Executor (`greedy_generate`, `decode_until_error`)."""
from __future__ import annotations

import json
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.multiprocessing as mp

from asyncpp.core.config import EngineConfig
from asyncpp.core.errors import EngineDeadError
from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine_args import EngineArgs, create_engine_config
from asyncpp.executor.executor import Executor
from asyncpp.executor.factory import create_executor
from asyncpp.worker.model_runner import ModelRunner

GREEDY = SamplingParams(temperature=0, ignore_eos=True)
EVERYTHING = 1 << 30  # as a chunk or an admission limit: no limit


def engine_config(model_dir: Path, pp: int = 1, **overrides: Any) -> EngineConfig:
    """A small CPU fp32 config without a tokenizer, one torch thread per rank; `overrides` win.
    Its default split is the estimate from bytes, the same on every run (engines started in
    tests measure theirs: `pp_layer_partition="auto"`)."""
    settings = {"pipeline_parallel_size": pp, "dtype": "float32", "device": "cpu", "skip_tokenizer_init": True,
                "num_threads": 1, "kv_cache_memory": "8MiB", "max_model_len": 512} | overrides
    settings["pp_layer_partition"] = settings.get("pp_layer_partition") or "cost"
    return create_engine_config(EngineArgs(model=str(model_dir), **settings))


# -- one virtual engine's sequences ---------------------------------------------------
@dataclass(slots=True)
class BlockAllocator:
    """A VE's KV blocks, handed out from a shuffled list: no accidental contiguity."""
    free: list[int]
    block_size: int

    @classmethod
    def shuffled(cls, num_blocks: int, block_size: int, seed: int = 0) -> BlockAllocator:
        blocks = list(range(num_blocks))
        random.Random(seed).shuffle(blocks)
        return cls(blocks, block_size)

    def grow(self, table: list[int], num_tokens: int) -> None:
        while len(table) * self.block_size < num_tokens:
            table.append(self.free.pop())

    def release(self, table: list[int]) -> None:
        self.free += table
        table.clear()


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

    def next_work(self, chunk: int, blocks: BlockAllocator) -> SeqWork:
        """The next prompt chunk, or the last token once the prompt is in the cache."""
        if self.computed < len(self.prompt):
            ids = self.prompt[self.computed:self.computed + chunk]
            ends_prompt = self.computed + len(ids) == len(self.prompt)
        else:
            ids, ends_prompt = [self.output[-1]], True
        blocks.grow(self.table, self.computed + len(ids))
        sample = SampleSpec(GREEDY, None, len(self.output)) if ends_prompt else None
        return SeqWork(self.seq_id, ids, self.computed, list(self.table), sample)


@dataclass(slots=True)
class GreedyVE:
    """One virtual engine: admits `admit_per_step` waiting sequences per step, computes
    prompts `chunk` tokens at a time, frees a sequence's blocks once it has `max_new` tokens."""
    ve_id: int
    waiting: list[Seq]
    blocks: BlockAllocator
    chunk: int = EVERYTHING
    admit_per_step: int = EVERYTHING
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    active: list[Seq] = field(default_factory=list)
    in_flight: list[tuple[Seq, SeqWork]] = field(default_factory=list)  # in microbatch order

    @property
    def finished(self) -> bool:
        return not self.waiting and not self.active

    def next_microbatch(self) -> MicroBatch:
        admitted = min(self.admit_per_step, len(self.waiting))
        self.active += self.waiting[:admitted]
        del self.waiting[:admitted]
        self.in_flight = [(s, s.next_work(self.chunk, self.blocks)) for s in self.active]
        self.rng.shuffle(self.in_flight)
        return MicroBatch(self.ve_id, [work for _, work in self.in_flight])

    def update(self, token_ids: list[int]) -> None:
        sampled = iter(token_ids)
        for seq, work in self.in_flight:
            seq.computed += work.num_tokens
            if work.sample is not None:
                seq.output.append(next(sampled))
        for seq in [s for s in self.active if s.done]:
            self.blocks.release(seq.table)
            self.active.remove(seq)


def sequences(prompts: list[list[int]], max_new: int) -> list[Seq]:
    return [Seq(i, list(p), max_new) for i, p in enumerate(prompts)]


# -- through ModelRunners ---------------------------------------------------------------
def runners_for(model_dir: Path, pp: int = 1, num_ves: int = 1, num_blocks: int = 400,
                **overrides: Any) -> list[ModelRunner]:
    """Every stage's runner in this process, each with `num_blocks` KV blocks per VE."""
    config = engine_config(model_dir, pp, **overrides)
    runners = [ModelRunner(config, stage) for stage in config.stages]
    for r in runners:
        r.init_kv_cache(num_ves, num_blocks)
    return runners


def generate(runners: list[ModelRunner], prompts: list[list[int]], max_new: int, *, chunk: int = 64,
             admit_per_step: int = 2, ve_id: int = 0, seed: int = 0, use_sampler: bool = False
             ) -> list[list[int]]:
    """Greedy tokens per prompt, with the stages run in order in this process."""
    seqs = sequences(prompts, max_new)
    blocks = BlockAllocator.shuffled(_num_blocks(runners[0]), runners[0].layout.block_size, seed)
    ve = GreedyVE(ve_id, list(seqs), blocks, chunk, admit_per_step, random.Random(seed))
    while not ve.finished:
        ve.update(_run_stages(runners, ve.next_microbatch(), use_sampler))
    return [s.output for s in seqs]


def _run_stages(runners: list[ModelRunner], mb: MicroBatch, use_sampler: bool) -> list[int]:
    intermediate = None
    for runner in runners[:-1]:
        intermediate = runner.forward(mb, intermediate)
        intermediate = {k: v.clone() for k, v in intermediate.items()}  # as if sent over the wire
    if use_sampler:
        return runners[-1].execute(mb, intermediate).token_ids
    logits = runners[-1].forward(mb, intermediate)
    assert logits.dtype == torch.float32 and logits.shape[0] == sum(s.sample is not None for s in mb.seqs)
    return logits.argmax(dim=-1).tolist()


def _num_blocks(runner: ModelRunner) -> int:
    return runner.kv_caches[0][0][0].shape[0]  # K (or MLA's latent) of VE 0's first layer: [blocks, ...]


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
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        config = engine_config(Path(model_dir), pp, tensor_parallel_size=world, distributed_executor_backend="mp")
        group = GlooGroup(rank, world)
        runners = [ModelRunner(config, s, group) for s in config.stages if s.tp_rank == rank]
        for r in runners:
            r.init_kv_cache(1, 400)
        tokens = generate(runners, prompts, max_new, chunk=64)
        sizes = [r.param_bytes() for r in runners]
        Path(f"{result_file}.{rank}").write_text(json.dumps({"tokens": tokens, "param_bytes": sizes}))
        torch.distributed.barrier()  # a peer tearing gloo down mid-collective aborts the other
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    # The work is done and written: skip gloo's teardown, which now and then aborts the
    # process ("terminate called without an active exception") as its threads are destroyed.
    os._exit(0)


def run_tensor_parallel(model_dir: Path, tmp_path: Path, prompts: list[list[int]], max_new: int, tp: int,
                        pp: int = 1) -> list[dict]:
    """`tp_worker` on `tp` spawned processes; each rank's tokens and parameter bytes."""
    result = tmp_path / "result"
    mp.spawn(tp_worker, args=(tp, str(model_dir), pp, prompts, max_new, f"file://{tmp_path}/rdzv", str(result)),
             nprocs=tp, join=True)
    return [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(tp)]


# -- through an Executor ------------------------------------------------------------------
@asynccontextmanager
async def running(config: EngineConfig, blocks_per_ve: int = 64) -> AsyncIterator[Executor]:
    """An executor started in a task group and always shut down, as AsyncLLM does it."""
    executor = create_executor(config)
    async with anyio.create_task_group() as tg:
        try:
            await executor.start(tg)
            await executor.init_kv_cache(blocks_per_ve)
            yield executor
        finally:
            await executor.shutdown()
            tg.cancel_scope.cancel()


def watch_deaths(executor: Executor) -> list[BaseException]:
    """What the executor tells its owner (the supervisor) when the pipeline fails."""
    deaths: list[BaseException] = []
    executor.on_dead = lambda _, error: deaths.append(error)
    return deaths


@dataclass(slots=True)
class InFlight:
    now: int = 0
    most: int = 0


async def greedy_generate(executor: Executor, prompts: list[list[int]], new_tokens: int,
                          num_ves: int, blocks_per_ve: int, block_size: int, threads: int = 0
                          ) -> tuple[list[list[int]], int]:
    """Spread prompts over `num_ves` concurrent VEs, each prefilling all its prompts in its
    first microbatch (each microbatch asking for `threads`); returns generated ids per prompt
    and the most microbatches that were submitted at once."""
    seqs = sequences(prompts, new_tokens)
    ves = [GreedyVE(v, seqs[v::num_ves], BlockAllocator.shuffled(blocks_per_ve, block_size, v))
           for v in range(num_ves)]
    in_flight = InFlight()

    async def run(ve: GreedyVE) -> None:
        while not ve.finished:
            mb = ve.next_microbatch()
            mb.threads = threads
            in_flight.now += 1
            in_flight.most = max(in_flight.most, in_flight.now)
            out = await executor.submit(mb)
            in_flight.now -= 1
            ve.update(out.token_ids)

    async with anyio.create_task_group() as tg:
        for ve in ves:
            tg.start_soon(run, ve)
    return [s.output for s in seqs], in_flight.most


async def decode_until_error(executor: Executor, ve_id: int, prompt: list[int], block_size: int,
                             running: anyio.Event) -> EngineDeadError:
    """One VE decoding a single sequence until a submit raises; returns that error.
    `running` is set once it has had a result back."""
    ve = GreedyVE(ve_id, sequences([prompt], 500 - len(prompt)), BlockAllocator.shuffled(64, block_size))
    try:
        while not ve.finished:
            ve.update((await executor.submit(ve.next_microbatch())).token_ids)
            running.set()
    except EngineDeadError as exc:
        return exc
    raise AssertionError("the executor never failed")
