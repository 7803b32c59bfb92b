"""Tiny random checkpoints built with transformers (seconds, no download): a Llama (or a
Qwen2, the same layers with q/k/v biases), a GPT-2, a Qwen3, a Qwen3-MoE, a Mixtral, a
Phi-3, a DeepSeek-V3 (and V2) and a gpt-oss, 4 layers of width 64, vocabulary `VOCAB`, bos id
1, eos id 2; `make_tiny_model` puts the Llama and the tiny tokenizer in one folder. Weights
are scaled up (initializer_range 0.2) so greedy choices are not near-ties, and the newer
families' norms are randomised so that loading them is checked too. Sliding windows: a
Mistral (every layer windowed), a Qwen2 (its upper layers windowed), a Gemma 3 and a Gemma 2
(local and global layers interleaved), windows of 32-40 tokens; gpt-oss's alternate layers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from asyncpp.model.mxfp4 import dequantize as mxfp4_dequantize
from asyncpp.model.mxfp4 import quantize as mxfp4_quantize
from asyncpp.testing.tiny_tokenizer import VOCAB_SIZE, make_tokenizer

VOCAB = VOCAB_SIZE


def make_llama(path: Path, *, layers: int = 4, tie: bool = False, qkv_bias: bool = False, vocab: int = VOCAB) -> Path:
    return _save(_llama(layers, tie, qkv_bias, vocab), path)


def make_llama_draft(path: Path, *, keep: int = 1, layers: int = 4, vocab: int = VOCAB) -> Path:
    """A draft model for make_llama's (same `layers` and `vocab`): its embeddings, its first `keep`
    layers, its final norm and head. It shares the target's vocabulary and agrees with it often."""
    model = _llama(layers, False, False, vocab)
    del model.model.layers[keep:]
    model.config.num_hidden_layers = keep
    return _save(model, path)


def _llama(layers: int, tie: bool, qkv_bias: bool, vocab: int) -> Any:
    # transformers' model classes take seconds to import; only a build needs them.
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=tie,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    model: Any = Qwen2ForCausalLM(Qwen2Config(**common)) if qkv_bias else LlamaForCausalLM(LlamaConfig(**common))
    return model.eval()


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


def make_deepseek_v3(path: Path, *, layers: int = 4, q_lora: bool = True, interleave: bool = True) -> Path:
    """Multi-head latent attention (latent 32 + rotary 16 per token; 4 heads of qk 32 + 16, v 24),
    a low-rank query (`q_lora`: rank 48; else a plain q_proj), YaRN (factor 4 over 256
    positions, mscale / mscale_all_dim changing the softmax scale), layer 0 dense, then 8
    experts in 4 groups (best 2 groups, top-2 experts, sigmoid scores with a random correction
    bias, renormalised, x2.5) beside one shared expert."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
            "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32.0, "beta_slow": 1.0}
    cfg = DeepseekV3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                           kv_lora_rank=32, q_lora_rank=48 if q_lora else None, qk_rope_head_dim=16,
                           qk_nope_head_dim=32, v_head_dim=24, n_routed_experts=8, n_shared_experts=1,
                           num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                           first_k_dense_replace=1, norm_topk_prob=True, rope_parameters=rope,
                           rope_interleave=interleave, max_position_embeddings=1024, num_mtp_layers=0,
                           initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    model = _random_norms(DeepseekV3ForCausalLM(cfg))
    with torch.no_grad():
        for name, p in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                p.uniform_(-0.2, 0.2)
    return _save(model, path)


def make_deepseek_v2(path: Path, *, layers: int = 4) -> Path:
    """DeepSeek-V2-Lite's shape: a plain q_proj, YaRN, layer 0 dense, then 8 experts in 4 groups
    (softmax scores, top-2 within the best 2 groups: `group_limited_greedy`, x1.5) beside two
    shared experts."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
            "mscale": 0.707, "mscale_all_dim": 0.707}
    cfg = DeepseekV2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=layers, num_attention_heads=4, kv_lora_rank=32, q_lora_rank=None,
                           qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=24, n_routed_experts=8,
                           n_shared_experts=2, num_experts_per_tok=2, n_group=4, topk_group=2,
                           topk_method="group_limited_greedy", routed_scaling_factor=1.5, first_k_dense_replace=1,
                           rope_parameters=rope, max_position_embeddings=1024, initializer_range=0.2,
                           bos_token_id=1, eos_token_id=2)
    return _save(_decisive_router(_random_norms(DeepseekV2ForCausalLM(cfg))), path)


def make_gpt_oss(path: Path, *, layers: int = 4, mxfp4: bool = False) -> Path:
    """Alternating sliding (window 48) and full layers with attention sinks, q/k/v/o biases,
    YaRN (factor 4 over 256 positions), 16 experts of 96, top-4, router and expert biases,
    the clamped SwiGLU (limit 3 rather than 7, so the clamps bite in a tiny model). The
    expert weights are rounded to MXFP4 values, so the dense checkpoint transformers writes
    and the MXFP4 one (`mxfp4`: the published layout, `*_blocks` and `*_scales` beside
    `quantization_config`) hold the same model."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 256,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, head_dim=16, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=4,
                       sliding_window=48, swiglu_limit=3.0, rope_parameters=rope, max_position_embeddings=1024,
                       initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = _decisive_router(_random_norms(GptOssForCausalLM(cfg)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.uniform_(-1.0, 2.0)  # enough to take real softmax mass
            elif name.endswith("_bias"):
                p.normal_(0.0, 0.2)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [experts, in, out]
                p.copy_(mxfp4_dequantize(*mxfp4_quantize(p.transpose(1, 2))).transpose(1, 2))
    _save(model, path)
    return _as_mxfp4(Path(path)) if mxfp4 else Path(path)


def _as_mxfp4(path: Path) -> Path:
    """Rewrite transformers' dense expert tensors [experts, in, out] as the published MXFP4 ones."""
    from safetensors.torch import load_file, save_file

    (file,) = path.glob("*.safetensors")
    tensors = load_file(file)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = mxfp4_quantize(tensors.pop(name).transpose(1, 2))
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


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
    """Gemma's norms scale by (1 + w), w starting at 0."""
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
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.mul_(4)
    return model


def _save(model: Any, path: Path, fused: bool = False) -> Path:  # a transformers PreTrainedModel
    model.save_pretrained(path, safe_serialization=True, save_original_format=not fused)
    return Path(path)
