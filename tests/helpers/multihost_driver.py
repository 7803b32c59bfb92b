"""The engine side of the multi-host test, run inside host A: an asyncpp server app (P=2,
ray backend) on the given Ray cluster. It writes what the test checks as JSON: the
placement, greedy token ids, and what a killed node did to the requests in flight and to
/health. It prints KILL when those requests are streaming and the test should take the
second host down.

    python tests/helpers/multihost_driver.py --model DIR --ray-address HOST:PORT --prompts FILE --out FILE
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's asyncpp, run as a script

from asyncpp import AsyncLLM, SamplingParams  # noqa: E402
from asyncpp.engine_args import EngineArgs  # noqa: E402
from asyncpp.server.app import build_app  # noqa: E402

IN_FLIGHT = 4
FAIL_WAIT_S = 30.0  # the test asserts far less; this only bounds the driver


async def greedy(engine: AsyncLLM, prompt: list[int], max_tokens: int) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tokens: list[int] = []
    async for out in engine.generate({"prompt_token_ids": prompt}, params):
        tokens = out.outputs[0].token_ids
    return list(tokens)


async def doomed(engine: AsyncLLM, prompt: list[int], started: anyio.Event, outcome: dict[str, Any]) -> None:
    """A long request: marks `started` at its second token, records how it ended."""
    params = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)
    try:
        async for out in engine.generate({"prompt_token_ids": prompt}, params):
            if len(out.outputs[0].token_ids) >= 2:
                started.set()
        outcome.update(ended="finished")
    except Exception as exc:
        outcome.update(ended="failed", error=type(exc).__name__, message=str(exc))
    outcome["at"] = time.time()


async def kill_mid_generation(engine: AsyncLLM) -> list[dict[str, Any]]:
    outcomes: list[dict[str, Any]] = [{} for _ in range(IN_FLIGHT)]
    events = [anyio.Event() for _ in range(IN_FLIGHT)]
    with anyio.move_on_after(FAIL_WAIT_S + 60):
        async with anyio.create_task_group() as tasks:
            for i in range(IN_FLIGHT):
                tasks.start_soon(doomed, engine, [5 + i, 7, 11], events[i], outcomes[i])
            for event in events:
                await event.wait()
            print("KILL", flush=True)
    return outcomes


async def main(ns: argparse.Namespace) -> dict[str, Any]:
    args = EngineArgs(model=ns.model, skip_tokenizer_init=True, pipeline_parallel_size=2, dtype="float32",
                      distributed_executor_backend="ray", ray_address=ns.ray_address, kv_cache_memory="64MiB",
                      num_threads=1)
    app = build_app(args)
    report: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        engine: AsyncLLM = app.state.server.engine
        report["placement"] = [asdict(p) for p in engine.placement()]
        prompts = json.loads(Path(ns.prompts).read_text())
        report["tokens"] = [await greedy(engine, p, ns.max_tokens) for p in prompts]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as http:
            report["health_before"] = (await http.get("/health")).status_code
            report["in_flight"] = await kill_mid_generation(engine)
            health = await http.get("/health")
            report["health_after"] = {"status": health.status_code, "body": health.text}
        report["dead_error"] = str(engine.dead_error())
        closing = time.time()
    report["shutdown_s"] = time.time() - closing
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--ray-address", "--prompts", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--max-tokens", type=int, default=8)
    ns = parser.parse_args()
    Path(ns.out).write_text(json.dumps(anyio.run(main, ns)))
