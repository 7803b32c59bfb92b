"""An anyio app that streams several requests at once from one in-process AsyncLLM, cancels
one halfway (as a timeout or a user's "stop" button would) and shows that it let go of its
KV-cache blocks at once. The same code runs under asyncio and trio.

    python examples/concurrent_streams.py                  # asyncio, the bundled SmolLM2
    python examples/concurrent_streams.py --backend trio --model path/to/hf-folder
"""
from __future__ import annotations

import argparse

import anyio

from asyncpp import AsyncLLM, SamplingParams

PROMPTS = {
    "paris": "The capital of France is",
    "fog": "San Francisco is a",
    "clock": "Once upon a time, a clockmaker",
    "model": "A language model is",
}
VICTIM = "clock"


async def stream(engine: AsyncLLM, name: str, params: SamplingParams, stop_after: int | None) -> None:
    """Consume one request's outputs (each one cumulative); stop it after `stop_after` tokens."""
    with anyio.CancelScope() as scope:
        # Leaving this block closes the stream, which aborts an unfinished request there and then.
        # (A bare `async for ... in engine.generate(...)` aborts too, but only once the abandoned
        # generator is collected, unless it is wrapped in contextlib.aclosing.)
        async with await engine.add_request(PROMPTS[name], params, request_id=name) as outputs:
            async for out in outputs:
                tokens = len(out.outputs[0].token_ids)
                if stop_after is not None and tokens >= stop_after:
                    before = engine.stats()
                    scope.cancel()  # as a timeout or a user's "stop" button would
                    await anyio.sleep(0)  # the cancellation lands at this await
    if scope.cancelled_caught:
        after = engine.stats()
        print(f"[{name}] cancelled after {tokens} tokens: running requests {before.num_running} -> "
              f"{after.num_running}, KV blocks in use {before.kv_blocks_used} -> {after.kv_blocks_used}")
    else:
        print(f"[{name}] {out.outputs[0].finish_reason} after {tokens} tokens: {out.outputs[0].text!r}")


async def main(ns: argparse.Namespace) -> None:
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True)
    async with AsyncLLM(ns.model, max_model_len=1024, kv_cache_memory="256MiB") as engine:
        async with anyio.create_task_group() as tg:
            for name in PROMPTS:
                tg.start_soon(stream, engine, name, params, ns.max_tokens // 4 if name == VICTIM else None)
        stats = engine.stats()
        print(f"all done: running requests {stats.num_running}, KV blocks in use {stats.kv_blocks_used}, "
              f"{stats.generation_tokens_total} tokens generated")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: the bundled SmolLM2)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--max-tokens", type=int, default=48)
    ns = parser.parse_args()
    anyio.run(main, ns, backend=ns.backend)
