"""Live moves of the stage split (--pp-rebalance's mechanism): under a steady load a move keeps
greedy parity with transformers, fails no request, leaks no KV block and keeps the stage
processes; a move whose stage cannot build its new layers is abandoned and the old split
serves on."""
from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path

import anyio
import pytest

from asyncpp import AsyncLLM, EngineDeadError, StageDiedError
from asyncpp.core.config import EngineConfig
from asyncpp.core.stages import StageSpec, format_partition
from asyncpp.worker.model_runner import ModelRunner
from helpers.models import expected_rank_bytes
from helpers.parity import greedy, hf_greedy, mixed_prompts
from helpers.processes import alive

pytestmark = pytest.mark.anyio

MAX_TOKENS = 12
PROMPTS = mixed_prompts(6, lo=8, hi=60, seed=3)
CONCURRENT = 4
BAD_SPLIT = [3.0, 1.0]
RECOVER_WITHIN_S = 120  # a liveness bound (spawning and loading stages on a busy machine), not a speed check


def engine(llama_dir: Path, **kwargs) -> AsyncLLM:
    return AsyncLLM(str(llama_dir), pipeline_parallel_size=2, pp_layer_partition=format_partition(BAD_SPLIT),
                    skip_tokenizer_init=True, dtype="float32", device="cpu", num_threads=1, **kwargs)


class Load:
    """Keeps CONCURRENT greedy requests running, cycling through PROMPTS, until stopped; keeps
    every request's tokens (by prompt index) and every error."""

    def __init__(self, llm: AsyncLLM):
        self.llm = llm
        self.tokens: list[tuple[int, list[int]]] = []
        self.errors: list[BaseException] = []
        self.stop = anyio.Event()
        self._next = itertools.cycle(range(len(PROMPTS)))

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(CONCURRENT):
                tg.start_soon(self._client)

    async def serving(self) -> None:
        """Until the engine has streamed some tokens of this load."""
        while self.llm.stats().generation_tokens_total < 20:
            await anyio.sleep(0.01)

    async def _client(self) -> None:
        while not self.stop.is_set():
            i = next(self._next)
            try:
                out = None
                async for out in self.llm.generate(PROMPTS[i], greedy(MAX_TOKENS)):
                    pass
                assert out is not None
                self.tokens.append((i, list(out.outputs[0].token_ids)))
            except Exception as e:  # every error counts against the test
                self.errors.append(e)
                while not self.llm.is_healthy() and not self.stop.is_set():  # refused while restarting
                    await anyio.sleep(0.05)


async def move_under_load(llm: AsyncLLM, splits: list[list[float]]) -> Load:
    load = Load(llm)
    async with anyio.create_task_group() as tg:
        tg.start_soon(load.run)
        for parts in splits:
            await load.serving()  # before the first move
            result = await llm.repartition(parts)
            assert result.moved, result.reason
            assert result.recomputed > 0  # the load was running when the pipeline paused
        served = len(load.tokens)
        while len(load.tokens) < served + CONCURRENT:  # and the new split serves on
            await anyio.sleep(0.01)
        load.stop.set()
    return load


async def test_moves_under_load_keep_parity_and_leak_nothing(llama_dir):
    async with engine(llama_dir) as llm:
        pids = llm.rank_pids()
        load = await move_under_load(llm, [[2.5, 1.5], [2.0, 2.0]])
        stats = llm.stats()
        assert load.errors == []
        assert stats.layer_partition == [2.0, 2.0]
        assert stats.rebalance.moves == 2 and stats.rebalance.abandoned == 0
        assert stats.rebalance.last_pause_ms > 0
        assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
        assert llm.param_bytes_per_rank() == expected_rank_bytes(llama_dir, 2, 1, "2,2")
        assert llm.rank_pids() == pids  # the same stage processes, their layers rebuilt in place
    expected = hf_greedy(llama_dir, PROMPTS, MAX_TOKENS)
    assert load.tokens and all(tokens == expected[i] for i, tokens in load.tokens)


def fails_on_split(config: EngineConfig, stage: StageSpec, tp_group) -> ModelRunner:
    """A stage that cannot build its layers of the split 2.5,1.5."""
    if config.layer_partition == [2.5, 1.5] and stage.pp_rank == 1:
        raise RuntimeError("injected: stage 1 of the new split failed to build")
    return ModelRunner(config, stage, tp_group=tp_group)


async def test_a_move_whose_new_stage_dies_is_abandoned_and_nothing_fails(llama_dir):
    async with engine(llama_dir, runner_factory=fails_on_split) as llm:
        pids = llm.rank_pids()
        load = Load(llm)
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await load.serving()
            result = await llm.repartition([2.5, 1.5])
            served = len(load.tokens)
            while len(load.tokens) < served + CONCURRENT:
                await anyio.sleep(0.01)
            load.stop.set()
        stats = llm.stats()
        assert not result.moved and "injected" in result.reason
        assert load.errors == [] and llm.is_healthy()
        assert llm.rank_pids() == pids and stats.layer_partition == BAD_SPLIT
        assert llm.param_bytes_per_rank() == expected_rank_bytes(llama_dir, 2, 1, "3,1")  # stage 0 went back
        assert stats.rebalance.moves == 0 and stats.rebalance.abandoned == 1
        assert stats.kv_blocks_used == 0
    expected = hf_greedy(llama_dir, PROMPTS, MAX_TOKENS)
    assert all(tokens == expected[i] for i, tokens in load.tokens)


async def test_a_move_while_a_serving_stage_dies_fails_cleanly(llama_dir):
    """The serving stage 1 is killed as a move begins: the requests of the failed pipeline end
    with StageDiedError as after any stage death, the move is given up, the engine restarts
    the old split and serves the same tokens again."""
    async with engine(llama_dir) as llm:
        old_pids = llm.rank_pids()
        load = Load(llm)
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await load.serving()
            moving = anyio.Event()
            outcome: list = []

            async def move() -> None:
                moving.set()
                outcome.append(await llm.repartition([2.5, 1.5]))

            tg.start_soon(move)
            await moving.wait()
            os.kill(old_pids[1], signal.SIGKILL)
            with anyio.fail_after(RECOVER_WITHIN_S):
                while not outcome or not llm.is_healthy():
                    await anyio.sleep(0.05)
                served = len(load.tokens)
                while len(load.tokens) < served + CONCURRENT:  # serving again after the restart
                    await anyio.sleep(0.01)
            load.stop.set()
        stats = llm.stats()
        assert not outcome[0].moved
        died = [e for e in load.errors if isinstance(e, StageDiedError)]
        assert died and all(e.stage == 1 for e in died), load.errors
        assert all(isinstance(e, EngineDeadError) for e in load.errors), load.errors  # refused while restarting
        assert stats.layer_partition == BAD_SPLIT and stats.rebalance.moves == 0
        assert stats.kv_blocks_used == 0
        assert not any(alive(p) for p in old_pids)
        assert llm.param_bytes_per_rank() == expected_rank_bytes(llama_dir, 2, 1, "3,1")
    expected = hf_greedy(llama_dir, PROMPTS, MAX_TOKENS)
    assert load.tokens and all(tokens == expected[i] for i, tokens in load.tokens)


async def test_pp_rebalance_moves_by_itself_under_load(llama_dir, tmp_path, monkeypatch):
    """With no threshold and short windows the busier stage of 3,1 under a steady load gives a
    layer half away on its own (which stage is busier is the machine's business); outputs keep
    parity and nothing leaks."""
    monkeypatch.setenv("ASYNCPP_CACHE_DIR", str(tmp_path / "cache"))  # no timing table: no veto
    async with engine(llama_dir, pp_rebalance=True, pp_rebalance_window=0.5, pp_rebalance_threshold=0.0) as llm:
        load = Load(llm)
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            with anyio.fail_after(RECOVER_WITHIN_S):
                while llm.stats().rebalance.moves < 1:
                    await anyio.sleep(0.05)
            served = len(load.tokens)
            with anyio.fail_after(RECOVER_WITHIN_S):
                while len(load.tokens) < served + CONCURRENT:
                    await anyio.sleep(0.01)
            load.stop.set()
        stats = llm.stats()
        assert load.errors == []
        assert stats.layer_partition in ([3.5, 0.5], [2.5, 1.5]) or stats.rebalance.moves > 1
        assert stats.kv_blocks_used == 0
    expected = hf_greedy(llama_dir, PROMPTS, MAX_TOKENS)
    assert all(tokens == expected[i] for i, tokens in load.tokens)
