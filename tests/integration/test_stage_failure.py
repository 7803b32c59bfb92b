"""A stage that dies or raises fails the engine fast and leaves no process behind."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest
import torch

from asyncpp.core.errors import EngineDeadError, MicrobatchError, StageDiedError
from asyncpp.core.microbatch import MicroBatch, SampleSpec, SeqWork
from asyncpp.executor.factory import create_executor
from helpers.driver import GREEDY, decode_until_error, engine_config, running, watch_deaths
from helpers.models import VOCAB
from helpers.parity import hf_greedy
from helpers.processes import alive, child_pids

pytestmark = pytest.mark.anyio

# A liveness bound, not a speed check: without it a broken executor hangs CI.
FAIL_WITHIN_S = 5


_baseline: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before():
    """Processes of session-wide fixtures (a server from another module) are not ours."""
    _baseline.clear()
    _baseline.update(child_pids())
    yield


def assert_no_children() -> None:
    assert set(child_pids()) - _baseline == set()  # first: active_children() would reap zombies
    assert [p for p in multiprocessing.active_children() if p.pid not in _baseline] == []


async def decode_on_every_ve(executor, config, then) -> list[BaseException]:
    """Keep every VE decoding; once all have results back, call `then()`; collect errors."""
    errors: list[BaseException] = []
    ready = [anyio.Event() for _ in range(config.num_virtual_engines)]

    async def ve(v: int) -> None:
        errors.append(await decode_until_error(executor, v, [5 + v, 6, 7], config.block_size,
                                               ready[v]))

    async with anyio.create_task_group() as tg:
        for v in range(config.num_virtual_engines):
            tg.start_soon(ve, v)
        for event in ready:
            await event.wait()
        with anyio.fail_after(FAIL_WITHIN_S):
            then()
            while len(errors) < len(ready):
                await anyio.sleep(0.01)
    return errors


async def test_killed_stage_fails_pending_submits(llama_dir):
    config = engine_config(llama_dir, 2)
    async with running(config) as executor:
        victim, deaths = executor.rank_pids()[0], watch_deaths(executor)
        errors = await decode_on_every_ve(executor, config, lambda: os.kill(victim, signal.SIGKILL))
        assert all(isinstance(e, StageDiedError) for e in errors), errors
        assert {(e.stage, e.rank, e.exitcode) for e in errors} == {(0, 0, -signal.SIGKILL)}
        assert deaths == [errors[0]]
        with pytest.raises(StageDiedError, match="stage 0"):
            await executor.submit(MicroBatch(0, [SeqWork(9, [5], 0, [0], SampleSpec(GREEDY, None, 0))]))
    assert_no_children()


async def test_killed_ray_actor_fails_pending_submits(llama_dir):
    pytest.importorskip("ray")
    config = engine_config(llama_dir, 2, distributed_executor_backend="ray")
    async with running(config) as executor:
        victim, deaths = executor.rank_pids()[1], watch_deaths(executor)
        errors = await decode_on_every_ve(executor, config, lambda: os.kill(victim, signal.SIGKILL))
        assert all(isinstance(e, StageDiedError) for e in errors), errors
        assert {(e.stage, e.rank) for e in errors} == {(1, 1)}
        assert deaths == [errors[0]]
    assert_no_children()


@pytest.mark.parametrize("backend", ["mp", "ray"])
async def test_exception_in_a_microbatch_fails_only_that_microbatch(llama_dir, backend):
    """A token id beyond the vocabulary makes the first stage's embedding raise: the next
    stage still gets a microbatch's worth of tensors, the stages stay in step, and the
    microbatches after it come out right."""
    if backend == "ray":
        pytest.importorskip("ray")
    config = engine_config(llama_dir, 2, distributed_executor_backend=backend)
    bad = MicroBatch(0, [SeqWork(0, [VOCAB + 11], 0, [0], SampleSpec(GREEDY, None, 0))])
    good = MicroBatch(0, [SeqWork(1, [5, 6, 7], 0, [1], SampleSpec(GREEDY, None, 0))])
    async with running(config) as executor:
        deaths = watch_deaths(executor)
        with anyio.fail_after(FAIL_WITHIN_S), pytest.raises(MicrobatchError, match="stage 0 .*Error") as info:
            await executor.submit(bad)
        assert "Traceback" in info.value.detail  # the worker's traceback comes along, for the log
        assert deaths == []
        assert (await executor.submit(good)).token_ids == hf_greedy(llama_dir, [[5, 6, 7]], 1)[0]
    assert_no_children()


class FailingKvRunner:
    """A rank that cannot allocate its KV cache: a failure outside any microbatch."""

    def __init__(self, config, stage, tp_group):
        self.stage = stage

    def param_bytes(self) -> int:
        return 0

    def num_available_blocks(self) -> int:
        return 64

    def init_kv_cache(self, num_virtual_engines: int, blocks_per_ve: int) -> None:
        if self.stage.is_last:
            raise MemoryError("no room for the KV cache")

    def intermediate_spec(self, num_tokens: int):
        return {"hidden_states": ((num_tokens, 8), torch.float32)}


async def test_a_rank_failing_outside_a_microbatch_ends_the_engine(llama_dir):
    config = engine_config(llama_dir, 2)
    executor = create_executor(config, FailingKvRunner)
    async with anyio.create_task_group() as tg:
        try:
            await executor.start(tg)
            with anyio.fail_after(FAIL_WITHIN_S), pytest.raises(EngineDeadError, match="stage 1 .*MemoryError"):
                await executor.init_kv_cache(8)
        finally:
            await executor.shutdown()
            tg.cancel_scope.cancel()
    assert_no_children()


async def test_shutdown_leaves_no_children_and_is_idempotent(llama_dir):
    config = engine_config(llama_dir, 2)
    async with running(config) as executor:
        deaths = watch_deaths(executor)
        assert len(set(child_pids()) - _baseline) == 2
        out = await executor.submit(MicroBatch(0, [SeqWork(0, [5, 6], 0, [0], SampleSpec(GREEDY, None, 0))]))
        assert len(out.token_ids) == 1
        await executor.shutdown()
        await executor.shutdown()
        assert deaths == []  # a shutdown is no failure: nothing to restart
        with pytest.raises(EngineDeadError, match="shut down"):
            await executor.submit(MicroBatch(0, [SeqWork(1, [5], 0, [1], SampleSpec(GREEDY, None, 0))]))
    assert_no_children()


async def test_cancelled_while_in_flight_then_shutdown(llama_dir):
    """Ctrl-C lands as cancellation of everything: shutdown runs in a cancelled scope."""
    config = engine_config(llama_dir, 2)
    ready = [anyio.Event(), anyio.Event()]
    with anyio.CancelScope() as scope:
        async with running(config) as executor, anyio.create_task_group() as tg:
            deaths = watch_deaths(executor)
            for v in range(2):
                tg.start_soon(decode_until_error, executor, v, [5 + v], config.block_size, ready[v])
            for event in ready:
                await event.wait()
            scope.cancel()
            await anyio.sleep(60)
    assert scope.cancelled_caught
    assert deaths == []
    assert_no_children()


_ORPHAN_SCRIPT = textwrap.dedent("""
    import sys, anyio
    sys.path.insert(0, {tests!r})
    from helpers.driver import engine_config, running

    async def main():
        async with running(engine_config({model!r}, 2)) as executor:
            print(" ".join(map(str, executor.rank_pids())), flush=True)
            await anyio.sleep(120)

    if __name__ == "__main__":
        anyio.run(main)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_stage_processes_die_with_a_killed_engine(llama_dir, tmp_path):
    """SIGKILL gives the engine no chance to clean up, and stopped stages (standing in for
    ones stuck in compute or a collective) never see their control pipe close: the kernel
    must take them down."""
    script = tmp_path / "engine.py"
    script.write_text(_ORPHAN_SCRIPT.format(tests=str(Path(__file__).parents[1]), model=str(llama_dir)))
    engine = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    stage_pids: list[int] = []
    try:
        stage_pids = [int(p) for p in engine.stdout.readline().split()]
        assert len(stage_pids) == 2 and all(alive(p) for p in stage_pids)
        for pid in stage_pids:
            os.kill(pid, signal.SIGSTOP)
        engine.kill()
        engine.wait()
        deadline = time.monotonic() + FAIL_WITHIN_S
        while any(alive(p) for p in stage_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in stage_pids)
    finally:
        engine.kill()
        for pid in filter(alive, stage_pids):
            os.kill(pid, signal.SIGKILL)
