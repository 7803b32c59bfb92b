"""Tiny random checkpoints built with transformers (seconds, no download): a Llama (or a
Qwen2, the same layers with q/k/v biases), a GPT-2, a Qwen3, a Qwen3-MoE, a Mixtral and a
Phi-3, 4 layers of width 64, vocabulary `VOCAB`, bos id 1, eos id 2; `make_tiny_model` puts
the Llama and the tiny tokenizer in one folder. Weights are scaled up (initializer_range 0.2)
so greedy choices are not near-ties, and the newer families' norms are randomised so that
loading them is checked too. Sliding windows: a Mistral (every layer windowed), a Qwen2 (its
upper layers windowed), a Gemma 3 and a Gemma 2 (local and global layers interleaved),
windows of 32-40 tokens."""
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


def make_qwen3(path: Path, *, layers: int = 4, tie: bool = False) -> Path:
    """head_dim 32, not hidden / heads = 16; per-head q/k norms."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                      rope_theta=1000000.0, tie_word_embeddings=tie, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=2)
    return _save(_random_norms(Qwen3ForCausalLM(cfg)), path)


def make_qwen3_moe(path: Path, *, layers: int = 4, fused: bool = False) -> Path:
    """8 experts, top-2, weights not renormalised; layer 1 a dense MLP (`mlp_only_layers`).
    `fused`: the per-layer expert tensors (transformers 5's own layout) instead of the
    published per-expert ones."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                         max_position_embeddings=1024, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    return _save(_decisive_router(_random_norms(Qwen3MoeForCausalLM(cfg))), path, fused)


def make_mixtral(path: Path, *, layers: int = 4, fused: bool = False) -> Path:
    """8 experts of 64, top-2 (`fused`: as make_qwen3_moe)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=1024, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    return _save(_decisive_router(_random_norms(MixtralForCausalLM(cfg))), path, fused)


def make_phi3(path: Path, *, layers: int = 4, tie: bool = False, longrope: bool = False,
              partial_rotary_factor: float = 1.0) -> Path:
    """Fused qkv_proj and gate_up_proj. `longrope` (with `partial_rotary_factor` 0.75 and a
    tied head: shaped as Phi-4-mini): short and long factors, original context 512 of 1024."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    rotary_half = int(16 * partial_rotary_factor) // 2
    scaling = {"rope_type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(rotary_half)],
               "long_factor": [4.0 + i for i in range(rotary_half)]} if longrope else None
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     original_max_position_embeddings=512 if longrope else 1024, rope_scaling=scaling,
                     partial_rotary_factor=partial_rotary_factor, tie_word_embeddings=tie, initializer_range=0.2,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save(_random_norms(Phi3ForCausalLM(cfg)), path)


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
    return _save(_random_gemma_norms(Gemma3ForCausalLM(cfg).eval()), path)


def make_gemma2(path: Path, *, window: int = 32, layers: int = 4) -> Path:
    """Gemma 2: local and global layers alternating, attention logits soft-capped at 50 and
    final logits at 30 (its defaults); untied as make_gemma3."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(6)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                       max_position_embeddings=1024, sliding_window=window, tie_word_embeddings=False,
                       initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save(_random_gemma_norms(Gemma2ForCausalLM(cfg).eval()), path)


def _random_gemma_norms(model: Any) -> Any:
    """Gemma's norms scale by (1 + w): weights around 0, each norm a little different."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def make_tiny_model(path: Path, *, layers: int = 4) -> Path:
    """A folder any asyncpp entry point loads as a model: the tiny Llama and its tokenizer."""
    make_llama(Path(path), layers=layers)
    return make_tokenizer(Path(path))


def _random_norms(model: Any) -> Any:
    """Norm weights away from transformers' initial ones, so a norm not loaded shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def _decisive_router(model: Any) -> Any:
    """Router logits spread wide, so no token's k-th and (k+1)-th experts are a near-tie."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(4)
    return model


def _save(model: Any, path: Path, fused: bool = False) -> Path:  # a transformers PreTrainedModel
    model.save_pretrained(path, safe_serialization=True, save_original_format=not fused)
    return Path(path)
