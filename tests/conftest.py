"""Shared fixtures: tiny random checkpoints (built by asyncpp.testing.tiny_model), and the HF oracle."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from asyncpp.testing.tiny_model import VOCAB, make_gpt2, make_llama

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny-qwen2"), qkv_bias=True, tie=True)


@pytest.fixture(params=["llama", "gpt2"])
def model_dir(request, llama_dir, gpt2_dir) -> Path:
    return {"llama": llama_dir, "gpt2": gpt2_dir}[request.param]


def mixed_prompts(count: int = 8, lo: int = 1, hi: int = 300, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of mixed lengths, always including both ends of the range."""
    rng = random.Random(seed)
    lengths = [lo, hi] + [rng.randint(lo, hi) for _ in range(count - 2)]
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


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


@pytest.fixture
def anyio_backend():
    return "asyncio"


def greedy(max_tokens: int) -> "SamplingParams":
    from asyncpp import SamplingParams
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def engine_tokens(model_dir: Path, prompts: list[list[int]], max_tokens: int, **engine_kwargs):
    """Greedy token ids from asyncpp's offline LLM, and the engine stats at the end."""
    from asyncpp import LLM

    engine_kwargs.setdefault("skip_tokenizer_init", True)
    with LLM(str(model_dir), **engine_kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens))
        stats = llm.engine.stats()
    return [o.outputs[0].token_ids for o in outs], stats


# KV bytes per block of the tiny models: 2 (K,V) * 4 layers * 16 tokens * 2 heads * 16 dims * 4 B.
TINY_LLAMA_BLOCK_BYTES = 2 * 4 * 16 * 2 * 16 * 4


def _children() -> dict[int, str]:
    from executor_helpers import child_pids

    found = {}
    for pid in child_pids():
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            pass
    return found


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """No process a test started may outlive it (engines, stage workers, servers)."""
    before = set(_children())
    yield
    import time

    deadline = time.monotonic() + 10
    while (leaked := {p: c for p, c in _children().items() if p not in before}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leaked, f"processes outlived the test: {leaked}"
