"""One row of benchmarks/multihost.py, run inside host A: workload W at P=2 on the ray
backend of the given cluster, printed as JSON. `--split` first holds one CPU of each node
(of two CPUs each), so no node has room for both stages."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import anyio
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's asyncpp, run as a script

from asyncpp import AsyncLLM, SamplingParams  # noqa: E402
from asyncpp.bench import RequestTrace, make_prompts, summarize  # noqa: E402


def wire_bytes(interface: str) -> int:
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


async def consume(engine: AsyncLLM, prompt: list[int], params: SamplingParams, trace: RequestTrace) -> None:
    trace.start = time.perf_counter()
    async for out in engine.generate({"prompt_token_ids": prompt}, params):
        trace.record(time.perf_counter(), len(out.outputs[0].token_ids))
        trace.token_ids = list(out.outputs[0].token_ids)


async def run(ns: argparse.Namespace) -> dict:
    prompts = make_prompts(ns.num_requests, ns.min_prompt_len, ns.max_prompt_len, 32000)
    params = SamplingParams(temperature=0, max_tokens=ns.output_len, ignore_eos=True)
    async with AsyncLLM(ns.model, skip_tokenizer_init=True, pipeline_parallel_size=2, dtype="float32",
                        distributed_executor_backend="ray", num_threads=1, kv_cache_memory="1GiB") as engine:
        async for _ in engine.generate({"prompt_token_ids": prompts[0][:16]}, SamplingParams(max_tokens=4)):
            pass
        warm = len(engine.stats().pipeline.hop_s[0])
        traces = [RequestTrace() for _ in prompts]
        wire_before, start = wire_bytes(ns.interface), time.perf_counter()
        async with anyio.create_task_group() as tasks:
            for prompt, trace in zip(prompts, traces):
                tasks.start_soon(consume, engine, prompt, params, trace)
        total = max(t.end for t in traces) - start
        wire = wire_bytes(ns.interface) - wire_before
        hop = engine.stats().pipeline.hop_s[0][warm:]
        placement = [asdict(p) for p in engine.placement()]
        shape, elem = engine.config.shape, engine.config.dtype.itemsize
    result = summarize("", "asyncpp", traces, total)
    tokens_crossing = sum(map(len, prompts)) + result.output_tokens  # every prompt and output token crosses once
    return {"tok_s": result.tokens_per_s, "output_tokens": result.output_tokens, "total_s": total,
            "itl_p50_ms": result.itl_p50_ms, "hop_s": hop, "placement": placement,
            "hidden_size": shape.hidden_size, "elem_bytes": elem, "wire_bytes_per_token": wire / tokens_crossing,
            "token_ids": [t.token_ids for t in traces]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ray-address", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--interface", required=True, help="this host's veth end, for the bytes on the wire")
    parser.add_argument("--split", action="store_true")
    for flag, default in (("--num-requests", 32), ("--min-prompt-len", 64), ("--max-prompt-len", 256),
                          ("--output-len", 128)):
        parser.add_argument(flag, type=int, default=default)
    ns = parser.parse_args()
    ray.init(address=ns.ray_address, log_to_driver=False)
    if ns.split:
        ips = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
        hold = ray.util.placement_group([{"CPU": 1, f"node:{ip}": 0.01} for ip in ips], strategy="SPREAD")
        ray.get(hold.ready(), timeout=60)
    print(json.dumps(anyio.run(run, ns)))
    ray.shutdown()


if __name__ == "__main__":
    main()
