"""Workload W: its model (a random Llama, built once in the cache) and its token-id prompts."""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch


def default_workload_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "asyncpp" / "bench" / "w-llama"


def make_workload_model(path: str | Path | None = None) -> Path:
    """Workload W's model: a random 8-layer Llama (hidden 512, 8 heads, vocab 32000), fp32.

    Built once with a fixed seed and reused; written to a temporary folder first so an
    interrupted build never leaves a half-written cache behind.
    """
    # transformers' model classes take seconds to import; only a first build needs them.
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path) if path is not None else default_workload_dir()
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=2048, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.2)  # sharp logits: greedy near-ties would make parity noisy
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
    return path


def make_prompts(count: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts with lengths uniform in [min_len, max_len], ids clear of 0..2 (pad/bos/eos)."""
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(count)]
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]
