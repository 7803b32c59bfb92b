"""Offline batch generation with `LLM`: every prompt at once, the model split over two
pipeline stages (two processes). No event loop and no server.

    python examples/offline_batch.py                       # the bundled SmolLM2
    python examples/offline_batch.py --model path/to/hf-folder --pipeline-parallel-size 1
"""
from __future__ import annotations

import argparse

from asyncpp import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "San Francisco is a",
    "A language model is",
    "Once upon a time, a clockmaker",
]


def main(ns: argparse.Namespace) -> None:
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens)
    # The engine starts here (stage processes, weights, KV cache) and stops at the end of the block.
    with LLM(ns.model, pipeline_parallel_size=ns.pipeline_parallel_size, max_model_len=1024,
             kv_cache_memory="256MiB") as llm:
        outputs = llm.generate(PROMPTS, params)  # in the order of the prompts
        for out in outputs:
            completion = out.outputs[0]
            print(f"{out.prompt!r} -> {completion.text!r} ({len(completion.token_ids)} tokens, "
                  f"{completion.finish_reason})")


if __name__ == "__main__":  # stage processes are spawned: they import this file again
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: the bundled SmolLM2)")
    parser.add_argument("--pipeline-parallel-size", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=24)
    main(parser.parse_args())
