"""A pipeline layout and what it does: the model's layers split over P stages (processes),
V virtual engines (each with its own scheduler and KV cache) taking turns so that every stage
has a microbatch to work on, and the pipeline statistics that show how well that went.

    python examples/pipeline_layout.py                                  # SmolLM2, 30 layers, P=2
    python examples/pipeline_layout.py --partition 17,13 --virtual-engines 1 2
    python examples/pipeline_layout.py --model path/to/hf-folder --pipeline-parallel-size 4

With V=1 one microbatch is in flight at a time, so while one stage works the other waits:
a bubble near 1 - 1/P. With V=P each stage works on another engine's microbatch meanwhile.
"""
from __future__ import annotations

import argparse

import anyio

from asyncpp import AsyncLLM, SamplingParams

PROMPTS = ["The capital of France is", "San Francisco is a", "A language model is",
           "Once upon a time, a clockmaker", "Numbers appear everywhere:", "The river bends"]


async def drain(engine: AsyncLLM, prompt: str, params: SamplingParams) -> None:
    async for _ in engine.generate(prompt, params):
        pass


async def run_layout(ns: argparse.Namespace, virtual_engines: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True)
    async with AsyncLLM(ns.model, pipeline_parallel_size=ns.pipeline_parallel_size, pp_layer_partition=ns.partition,
                        num_virtual_engines=virtual_engines, max_model_len=1024, kv_cache_memory="256MiB") as engine:
        config = engine.config
        print(f"P={ns.pipeline_parallel_size}, V={config.num_virtual_engines}: {config.shape.num_layers} layers split "
              f"{config.layer_partition}; parameter MiB per rank "
              f"{[round(b / 2**20, 1) for b in engine.param_bytes_per_rank()]}")
        async with anyio.create_task_group() as tg:
            for prompt in PROMPTS * ns.copies:
                tg.start_soon(drain, engine, prompt, params)
        pipe = engine.stats().pipeline
        busy = " / ".join(f"{f:.2f}" for f in pipe.busy_fractions)
        print(f"  {pipe.microbatches} microbatches in {pipe.active_s:.2f} s; stage busy {busy}; "
              f"bubble {pipe.bubble_fraction:.2f}")


async def main(ns: argparse.Namespace) -> None:
    for virtual_engines in ns.virtual_engines:
        await run_layout(ns, virtual_engines)


if __name__ == "__main__":  # stage processes are spawned: they import this file again
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: the bundled SmolLM2)")
    parser.add_argument("--pipeline-parallel-size", type=int, default=2)
    parser.add_argument("--partition", default=None, help="layers per stage, e.g. 17,13 (default: the engine's split)")
    parser.add_argument("--virtual-engines", type=int, nargs="+", default=[1, 2], help="one run per value")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--copies", type=int, default=2, help="each prompt this many times")
    anyio.run(main, parser.parse_args())
