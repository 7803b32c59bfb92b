"""Tiny random checkpoints built with transformers (seconds, no download): a Llama (or a
Qwen2, the same layers with q/k/v biases) and a GPT-2, 4 layers of width 64, vocabulary
`VOCAB`, bos id 1, eos id 2; `make_tiny_model` puts the Llama and the tiny tokenizer in one folder.
Sliding windows: a Mistral (every layer windowed), a Qwen2 (its upper layers windowed), a
Gemma 3 and a Gemma 2 (local and global layers interleaved), windows of 32-40 tokens."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from asyncpp.testing.tiny_tokenizer import VOCAB_SIZE, make_tokenizer

VOCAB = VOCAB_SIZE


def make_llama(path: Path, *, layers: int = 4, tie: bool = False, qkv_bias: bool = False, vocab: int = VOCAB) -> Path:
    # transformers' model classes take seconds to import; only a build needs them.
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=tie,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    model: Any = Qwen2ForCausalLM(Qwen2Config(**common)) if qkv_bias else LlamaForCausalLM(LlamaConfig(**common))
    return _save(model.eval(), path)


def make_gpt2(path: Path, *, layers: int = 4) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=1024,
                     initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    return _save(GPT2LMHeadModel(cfg).eval(), path)


def make_mistral_swa(path: Path, *, window: int = 40, layers: int = 4) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(3)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        sliding_window=window, rope_theta=10000.0, initializer_range=0.2,
                        bos_token_id=1, eos_token_id=2)
    return _save(MistralForCausalLM(cfg).eval(), path)


def make_qwen2_swa(path: Path, *, window: int = 40, layers: int = 4) -> Path:
    """Layers from `max_window_layers` (2) on are windowed, as Qwen2's config decides."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(4)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      use_sliding_window=True, sliding_window=window, max_window_layers=2,
                      initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    return _save(Qwen2ForCausalLM(cfg).eval(), path)


def make_gemma3(path: Path, *, window: int = 32, layers: int = 5, tie: bool = False) -> Path:
    """Gemma 3 text: local, local, global, local, local (sliding_window_pattern 3); head_dim 32
    (not hidden / heads), query_pre_attn_scalar 24, linear rope scaling on the global layers
    with their own base; norm weights random (transformers starts them at 0, i.e. scale 1).
    Untied by default: a random tied head with Gemma's scaled embeddings repeats the last
    token forever, which would hide attention errors."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(5)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                           max_position_embeddings=1024, sliding_window=window, sliding_window_pattern=3,
                           rope_theta=100000.0, rope_local_base_freq=10000.0,
                           rope_scaling={"rope_type": "linear", "factor": 8.0},
                           tie_word_embeddings=tie, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    return _save(_random_norms(Gemma3ForCausalLM(cfg).eval()), path)


def make_gemma2(path: Path, *, window: int = 32, layers: int = 4) -> Path:
    """Gemma 2: local and global layers alternating, attention logits soft-capped at 50 and
    final logits at 30 (its defaults); untied as make_gemma3."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(6)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                       max_position_embeddings=1024, sliding_window=window, tie_word_embeddings=False,
                       initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save(_random_norms(Gemma2ForCausalLM(cfg).eval()), path)


def _random_norms(model: Any) -> Any:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def make_tiny_model(path: Path, *, layers: int = 4) -> Path:
    """A folder any asyncpp entry point loads as a model: the tiny Llama and its tokenizer."""
    make_llama(Path(path), layers=layers)
    return make_tokenizer(Path(path))


def _save(model: Any, path: Path) -> Path:  # a transformers PreTrainedModel
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)
