"""Tiny random checkpoints built with transformers, and what a stage should load from them."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from asyncpp.core.stages import StageSpec

VOCAB = 1000
# KV bytes per block of the tiny models: 2 (K,V) * 4 layers * 16 tokens * 2 heads * 16 dims * 4 B.
TINY_LLAMA_BLOCK_BYTES = 2 * 4 * 16 * 2 * 16 * 4


def make_llama(path: Path, *, layers: int = 4, tie: bool = False, qkv_bias: bool = False,
               vocab: int = VOCAB) -> Path:
    """A tiny Llama, or with `qkv_bias` a Qwen2 (the same layers with q/k/v biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
              "rope_theta": 10000.0, "tie_word_embeddings": tie, "initializer_range": 0.2,
              "bos_token_id": 1, "eos_token_id": 2}
    if qkv_bias:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return _save(model.eval(), path)


def make_gpt2(path: Path, *, layers: int = 4) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=1024,
                     initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    return _save(GPT2LMHeadModel(cfg).eval(), path)


def _save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_FIRST = ("embed_tokens", "wte", "wpe")
_LAST = ("model.norm", "ln_f", "lm_head")


def checkpoint_share(model_dir: Path, stage: StageSpec, tied: bool) -> int:
    """Parameter bytes a stage should load: its layers, the embedding on the first, the
    final norm and head on the last (a tied head counts the embedding there again)."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for name in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                t = f.get_slice(name)
                size = _nbytes(t.get_shape(), t.get_dtype())
                m = _LAYER.search(name)
                if m:
                    total += size if stage.layer_start <= int(m.group(1)) < stage.layer_end else 0
                elif any(k in name for k in _FIRST):
                    owners = stage.is_first or (tied and stage.is_last and "wpe" not in name)
                    total += size if owners else 0
                elif any(k in name for k in _LAST):
                    total += size if stage.is_last else 0
    return total


def _nbytes(shape: list[int], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * {"F32": 4, "F16": 2, "BF16": 2}[dtype]
