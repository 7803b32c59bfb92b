"""A stage that dies or hangs fails the requests in flight, naming the stage; the engine
restarts every stage by itself (bounded) and serves again with the same outputs, and
nothing of the failed generation is left behind."""
from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import anyio
import httpx
import pytest

from asyncpp import AsyncLLM, EngineDeadError, StageDiedError
from asyncpp.core.errors import MicrobatchError, StageHungError
from asyncpp.server.app import build_app
from asyncpp.server.metrics import ServerMetrics
from asyncpp.server.serving import ServerState
from asyncpp.worker.model_runner import ModelRunner
from asyncpp.worker.shm_common import SHM_PREFIX, shm_dir
from helpers.parity import greedy, hf_greedy, mixed_prompts

pytestmark = pytest.mark.anyio

RECOVER_WITHIN_S = 60  # a liveness bound (spawning and loading two stages), not a speed check
PROMPT = [5, 6, 7, 8]


def engine(llama_dir: Path, **kwargs) -> AsyncLLM:
    return AsyncLLM(str(llama_dir), pipeline_parallel_size=2, skip_tokenizer_init=True, dtype="float32",
                    device="cpu", num_threads=1, **kwargs)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def consume(engine: AsyncLLM, prompt: list[int], errors: list[BaseException]) -> None:
    try:
        async for _ in engine.generate(prompt, greedy(400)):
            pass
    except EngineDeadError as e:
        errors.append(e)


async def fail_a_stage_under_load(llm: AsyncLLM, stage_pid: int, sig: int) -> list[BaseException]:
    """Stream four long requests, send `sig` to a stage mid-way, collect the requests' errors."""
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        for prompt in mixed_prompts(4, lo=20, hi=60, seed=1):
            tg.start_soon(consume, llm, prompt, errors)
        with anyio.fail_after(RECOVER_WITHIN_S):
            while llm.stats().generation_tokens_total < 20:
                await anyio.sleep(0.01)
        os.kill(stage_pid, sig)
    return errors


async def wait_healthy(llm: AsyncLLM) -> None:
    with anyio.fail_after(RECOVER_WITHIN_S):
        while not llm.is_healthy():
            await anyio.sleep(0.05)


def shm_files() -> set[str]:
    return {p.name for p in Path(shm_dir()).glob(f"{SHM_PREFIX}*")}


async def test_killed_stage_restarts_and_serves_the_same_tokens(llama_dir):
    before = shm_files()
    async with engine(llama_dir) as llm:
        old = llm.rank_pids()
        errors = await fail_a_stage_under_load(llm, old[1], signal.SIGKILL)
        assert len(errors) == 4 and all(isinstance(e, StageDiedError) and e.stage == 1 for e in errors), errors
        assert llm.stats().kv_blocks_used == 0
        await wait_healthy(llm)
        new = llm.rank_pids()
        assert set(new).isdisjoint(old) and not any(alive(p) for p in old)
        out = [o async for o in llm.generate(PROMPT, greedy(8))][-1]
    assert out.outputs[0].token_ids == hf_greedy(llama_dir, [PROMPT], 8)[0]
    assert not any(alive(p) for p in new) and shm_files() <= before


async def test_refused_while_restarting(llama_dir):
    async with engine(llama_dir) as llm:
        await fail_a_stage_under_load(llm, llm.rank_pids()[0], signal.SIGKILL)
        assert not llm.is_healthy()
        with pytest.raises(EngineDeadError, match="restarting the pipeline stages after: pipeline stage 0"):
            await llm.add_request(PROMPT, greedy(4))
        await wait_healthy(llm)


async def test_hung_stage_is_caught_by_the_watchdog_and_restarted(llama_dir):
    async with engine(llama_dir, stage_timeout=2.0) as llm:
        old = llm.rank_pids()
        errors = await fail_a_stage_under_load(llm, old[1], signal.SIGSTOP)
        assert errors and all(isinstance(e, StageHungError) and e.stage == 1 for e in errors), errors
        await wait_healthy(llm)
        assert not any(alive(p) for p in old)  # the stopped process was killed, not left behind
        out = [o async for o in llm.generate(PROMPT, greedy(8))][-1]
    assert out.outputs[0].token_ids == hf_greedy(llama_dir, [PROMPT], 8)[0]


async def test_restarts_are_bounded(llama_dir):
    async with engine(llama_dir, max_stage_restarts=1) as llm:
        await fail_a_stage_under_load(llm, llm.rank_pids()[1], signal.SIGKILL)
        await wait_healthy(llm)
        await fail_a_stage_under_load(llm, llm.rank_pids()[1], signal.SIGKILL)
        with anyio.fail_after(RECOVER_WITHIN_S):
            while "not restarted" not in str(llm.dead_error()):
                await anyio.sleep(0.05)
        assert "--max-stage-restarts 1" in str(llm.dead_error()) and not llm.is_healthy()
        with pytest.raises(EngineDeadError):
            await llm.add_request(PROMPT, greedy(4))


async def kill_stage_then_a_fresh_one(llm: AsyncLLM) -> None:
    """SIGKILL stage 0, then one of the stages the restart spawns, as soon as it exists
    (while the new stages start and load)."""
    # Every stage alive now, this engine's or not (a session-wide engine of the pytest plugin
    # may be running too): only a stage spawned after the kill is the restart's.
    old = stage_pids()
    os.kill(min(llm.rank_pids()), signal.SIGKILL)
    with anyio.fail_after(RECOVER_WITHIN_S):
        while not (fresh := stage_pids() - old):
            await anyio.sleep(0.01)
    os.kill(min(fresh), signal.SIGKILL)


def stage_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if p.name.startswith("asyncpp-stage")}


async def test_a_stage_dying_during_the_restart_is_restarted_again(llama_dir):
    async with engine(llama_dir, max_stage_restarts=2) as llm:
        await kill_stage_then_a_fresh_one(llm)
        await wait_healthy(llm)
        out = [o async for o in llm.generate(PROMPT, greedy(8))][-1]
    assert out.outputs[0].token_ids == hf_greedy(llama_dir, [PROMPT], 8)[0]


async def test_a_death_during_the_last_restart_leaves_the_engine_down_for_good(llama_dir):
    before, others = shm_files(), stage_pids()
    async with engine(llama_dir, max_stage_restarts=1) as llm:
        await kill_stage_then_a_fresh_one(llm)
        with anyio.fail_after(RECOVER_WITHIN_S):
            while llm.dead_error() is None or not llm.dead_error().permanent:
                await anyio.sleep(0.05)
        assert not stage_pids() - others
        app = build_app(llm)
        app.state.server = ServerState(llm, ServerMetrics(llm.stats, llm.model_name))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as http:
            health = await http.get("/health")
            refused = await http.post("/v1/completions", json={"prompt": PROMPT})
        for response in (health, refused):
            message = response.json()["error"]["message"]
            assert response.status_code == 503 and "retry-after" not in response.headers, response.headers
            assert message.startswith("the engine is down for good: pipeline stage ") and "--max-stage-restarts 1" \
                in message and message.count("engine") == 1, message
    assert shm_files() <= before


POISON = 999  # a valid token id that this runner refuses, standing in for any per-input failure


class PoisonRunner(ModelRunner):
    def execute(self, mb, intermediate):
        if any(POISON in s.token_ids for s in mb.seqs):
            raise ValueError("poisoned input")
        return super().execute(mb, intermediate)


async def test_a_failing_microbatch_fails_its_requests_only(llama_dir):
    async with engine(llama_dir, runner_factory=PoisonRunner) as llm:
        with pytest.raises(MicrobatchError, match="stage 0 .*ValueError: poisoned input"):
            async for _ in llm.generate([5, POISON, 7], greedy(4)):
                pass
        assert llm.is_healthy() and llm.stats().kv_blocks_used == 0
        prompts = mixed_prompts(3, lo=5, hi=40, seed=2)
        outs = []
        for prompt in prompts:
            final = [o async for o in llm.generate(prompt, greedy(6))][-1]
            outs.append(final.outputs[0].token_ids)
    assert outs == hf_greedy(llama_dir, prompts, 6)
