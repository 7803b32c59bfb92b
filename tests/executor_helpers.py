"""Drive an executor by hand, as virtual engines would: build microbatches, greedy-decode."""
from __future__ import annotations

import os
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import anyio
from safetensors import safe_open

from asyncpp.config import EngineArgs, EngineConfig, create_engine_config
from asyncpp.core.stages import StageSpec
from asyncpp.executor.executor import Executor
from asyncpp.executor.factory import create_executor
from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork
from asyncpp.core.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def engine_config(model_dir: Path, pp: int = 1, **kwargs) -> EngineConfig:
    args = EngineArgs(model=str(model_dir), pipeline_parallel_size=pp, dtype="float32",
                      device="cpu", skip_tokenizer_init=True, num_threads=1,
                      kv_cache_memory="8MiB", max_model_len=512, **kwargs)
    return create_engine_config(args)


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


@dataclass(slots=True)
class Seq:
    seq_id: int
    tokens: list[int]  # prompt + generated
    prompt_len: int
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens already in the KV cache

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


class BumpAllocator:
    """A VE's KV blocks, handed out in order and never freed (enough for a short test)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.free = list(range(num_blocks))
        self.block_size = block_size

    def cover(self, seq: Seq, num_tokens: int) -> None:
        while len(seq.blocks) * self.block_size < num_tokens:
            seq.blocks.append(self.free.pop(0))


@dataclass(slots=True)
class GreedyVE:
    """One virtual engine's sequences: a prefill step for all, then decode steps."""
    ve_id: int
    seqs: list[Seq]
    allocator: BumpAllocator

    def next_microbatch(self) -> MicroBatch:
        work = []
        for s in self.seqs:
            todo = s.tokens[s.computed:]
            self.allocator.cover(s, len(s.tokens))
            spec = SampleSpec(params=GREEDY, seed=None, step=len(s.generated))
            work.append(SeqWork(s.seq_id, todo, s.computed, list(s.blocks), spec))
        return MicroBatch(self.ve_id, work)

    def update(self, token_ids: list[int]) -> None:
        assert len(token_ids) == len(self.seqs)
        for s, t in zip(self.seqs, token_ids):
            s.computed = len(s.tokens)
            s.tokens.append(t)


@dataclass(slots=True)
class InFlight:
    now: int = 0
    most: int = 0


async def greedy_generate(executor: Executor, prompts: list[list[int]], new_tokens: int,
                          num_ves: int, blocks_per_ve: int, block_size: int
                          ) -> tuple[list[list[int]], int]:
    """Spread prompts over `num_ves` concurrent VEs; returns generated ids per prompt and
    the most microbatches that were in flight at once."""
    seqs = [Seq(i, list(p), len(p)) for i, p in enumerate(prompts)]
    ves = [GreedyVE(v, seqs[v::num_ves], BumpAllocator(blocks_per_ve, block_size))
           for v in range(num_ves)]
    in_flight = InFlight()

    async def run(ve: GreedyVE) -> None:
        for _ in range(new_tokens):
            mb = ve.next_microbatch()
            in_flight.now += 1
            in_flight.most = max(in_flight.most, in_flight.now)
            out = await executor.submit(mb)
            in_flight.now -= 1
            ve.update(out.token_ids)

    async with anyio.create_task_group() as tg:
        for ve in ves:
            tg.start_soon(run, ve)
    return [s.generated for s in seqs], in_flight.most


async def decode_until_error(executor: Executor, ve_id: int, prompt: list[int], block_size: int,
                             running: anyio.Event) -> BaseException:
    """One VE decoding a single sequence until a submit raises; returns that error.
    `running` is set once it has had a result back."""
    ve = GreedyVE(ve_id, [Seq(0, list(prompt), len(prompt))], BumpAllocator(64, block_size))
    try:
        while len(ve.seqs[0].tokens) < 500:
            ve.update((await executor.submit(ve.next_microbatch())).token_ids)
            running.set()
    except Exception as exc:
        return exc
    raise AssertionError("the executor never failed")


_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_FIRST = ("embed_tokens", "wte", "wpe")
_LAST = ("model.norm", "ln_f", "lm_head")


def checkpoint_share(model_dir: Path, stage: StageSpec, tied: bool) -> int:
    """Parameter bytes a stage should load: its layers, the embedding on the first, the
    final norm and head on the last (a tied head counts the embedding there again)."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                size = _nbytes(t.get_shape(), t.get_dtype())
                m = _LAYER.search(name)
                if m:
                    total += size if stage.layer_start <= int(m.group(1)) < stage.layer_end else 0
                elif any(k in name for k in _FIRST):
                    owners = stage.is_first or (tied and stage.is_last and "wpe" not in name)
                    total += size if owners else 0
                elif any(k in name for k in _LAST):
                    total += size if stage.is_last else 0
    return total


def _nbytes(shape: list[int], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * {"F32": 4, "F16": 2, "BF16": 2}[dtype]


def child_pids() -> list[int]:
    """Processes whose parent is this one, zombies included (from /proc), except the
    resource tracker multiprocessing keeps for the life of the process."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me and int(entry) != tracker:
                pids.append(int(entry))
    return pids
