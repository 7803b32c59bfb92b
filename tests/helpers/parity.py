"""Greedy parity: prompts of mixed lengths, the transformers oracle, and asyncpp's answer."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from asyncpp import LLM, SamplingParams
from asyncpp.async_llm import EngineStats
from asyncpp.core.stages import format_partition
from helpers.models import VOCAB, expected_rank_bytes

BLOCK = 16  # the engine's default KV block size
SMALL_VOCAB = 12  # the vocabulary of llama_v12_dir: greedy output soon repeats itself


def mixed_prompts(count: int = 8, lo: int = 1, hi: int = 300, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of mixed lengths, always including both ends of the range."""
    rng = random.Random(seed)
    lengths = [lo, hi] + [rng.randint(lo, hi) for _ in range(count - 2)]
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts sharing one 64-token prefix (4 blocks) by various lengths."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    base = tokens(4 * BLOCK)
    return [
        base,
        base[:10] + tokens(7),  # shares less than a block
        base[:2 * BLOCK],  # exactly two blocks
        base[:2 * BLOCK] + tokens(3),  # two blocks and a few tokens
        base,  # the whole prompt is cached
        base + tokens(40),
        base[:3 * BLOCK] + tokens(25),
    ]


def repeating_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts of the small-vocabulary model: a phrase said again, and runs of noise."""
    rng = random.Random(seed)
    phrase = [rng.randrange(3, SMALL_VOCAB) for _ in range(9)]
    noise = [rng.randrange(3, SMALL_VOCAB) for _ in range(70)]
    return [phrase * 3, phrase + noise[:20] + phrase[:4], noise, noise[:5], phrase * 2 + noise[:33]]


_HF_CACHE: dict[tuple, list[int]] = {}


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The oracle: transformers generate(), greedy fp32, one prompt at a time, EOS ignored."""
    from transformers import AutoModelForCausalLM

    model = None
    results = []
    for prompt in prompts:
        key = (str(model_dir), tuple(prompt), max_new_tokens)
        if key not in _HF_CACHE:
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
                model.generation_config.eos_token_id = None  # run on through EOS, never suppress it
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=0)
            _HF_CACHE[key] = out[0, len(prompt):].tolist()
        results.append(_HF_CACHE[key])
    return results


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def engine_tokens(model_dir: Path, prompts: list[list[int]], max_tokens: int,
                  **engine_kwargs: Any) -> tuple[list[list[int]], EngineStats]:
    """Greedy token ids from asyncpp's offline LLM, and the engine stats at the end."""
    engine_kwargs.setdefault("skip_tokenizer_init", True)
    with LLM(str(model_dir), **engine_kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens))
        stats = llm.engine.stats()
    return [o.outputs[0].token_ids for o in outs], stats


def tp_run(model_dir: Path, pp: int, tp: int, seed: int, partition: str | None = None, max_tokens: int = 8,
           prompts: list[list[int]] | None = None) -> EngineStats:
    """Greedy parity of a P x T engine with transformers, and each rank holding only its
    slices; the engine stats at the end."""
    prompts = prompts or mixed_prompts(6, seed=seed)
    with LLM(str(model_dir), skip_tokenizer_init=True, pipeline_parallel_size=pp, tensor_parallel_size=tp,
             pp_layer_partition=partition, max_num_batched_tokens=96) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens))
        per_rank = llm.engine.param_bytes_per_rank()
        stats = llm.engine.stats()
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(model_dir, prompts, max_tokens)
    assert per_rank == expected_rank_bytes(model_dir, pp, tp, format_partition(stats.layer_partition))
    return stats
