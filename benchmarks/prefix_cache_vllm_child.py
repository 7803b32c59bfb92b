"""The vLLM side of benchmarks/prefix_cache.py: the same arrivals through vLLM's own async
engine (prefix caching on), in vLLM's interpreter. Imports only the standard library and vLLM.

    VLLM_VENV/bin/python benchmarks/prefix_cache_vllm_child.py JOB.json RESULT.json

JOB.json: model, prompts (token ids), offsets (arrival seconds), output_len, cores.
RESULT.json: vLLM's version, and per request: ttft_s, end_s (from the first arrival), cached
tokens, output token ids.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from peer_vllm_child import configure_environment


async def run(job: dict) -> dict:
    import vllm
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=job["model"], dtype="float32", enable_prefix_caching=True, skip_tokenizer_init=True, seed=0))
    params = SamplingParams(temperature=0.0, max_tokens=job["output_len"], ignore_eos=True)
    try:
        for i, prompt in enumerate(job["warmup"]):
            async for _ in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, f"warmup-{i}"):
                pass
        await engine.reset_prefix_cache()
        start = time.perf_counter()

        async def one(i: int) -> dict:
            await asyncio.sleep(max(0.0, start + job["offsets"][i] - time.perf_counter()))
            sent, first, out = time.perf_counter(), None, None
            async for out in engine.generate(TokensPrompt(prompt_token_ids=job["prompts"][i]), params, str(i)):
                first = first or time.perf_counter()
            return {"ttft_s": first - sent, "end_s": time.perf_counter() - start,
                    "cached": out.num_cached_tokens or 0, "token_ids": list(out.outputs[0].token_ids)}

        requests = await asyncio.gather(*(one(i) for i in range(len(job["prompts"]))))
    finally:
        engine.shutdown()
    return {"version": vllm.__version__, "requests": requests}


def main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    configure_environment(job["cores"])
    Path(result_path).write_text(json.dumps(asyncio.run(run(job))))


if __name__ == "__main__":
    main(*sys.argv[1:3])
