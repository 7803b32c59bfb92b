"""Which Hugging Face architectures asyncpp implements, and building one stage of them."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from asyncpp.core.config import EngineConfig
from asyncpp.core.stages import StageSpec
from asyncpp.model.gemm import onednn_available, prepare_model
from asyncpp.model.gemma3 import GemmaForCausalLM
from asyncpp.model.gpt2 import GPT2LMHeadModel
from asyncpp.model.llama import LlamaForCausalLM
from asyncpp.model.loader import Checkpoint, load_weights
from asyncpp.model.mixtral import MixtralForCausalLM
from asyncpp.model.parallel import SingleRankGroup, TPGroup
from asyncpp.model.phi3 import Phi3ForCausalLM
from asyncpp.model.qwen3 import Qwen3ForCausalLM, Qwen3MoeForCausalLM
from asyncpp.model.rotary import STATIC_ROPE_TYPES, rope_parameters
from asyncpp.model.sliding_window import check_layer_types

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
}
# Architectures refused with a reason rather than as unknown.
REFUSED = {
    "Gemma3ForConditionalGeneration": "the image + text Gemma 3 is not supported; serve a text-only "
                                      "Gemma3ForCausalLM checkpoint (model_type gemma3_text)",
}
PHI3_ROPE_TYPES = ("default", "longrope")  # the two Phi-3's transformers code applies


def architecture(hf_config: Any) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in MODELS:
            return arch
    for arch in archs:
        if arch in REFUSED:
            raise ValueError(f"{arch}: {REFUSED[arch]}")
    raise ValueError(f"unsupported model architecture {archs or getattr(hf_config, 'model_type', '?')}; "
                     f"asyncpp supports {', '.join(MODELS)}")


def check_supported(hf_config: Any, max_model_len: int | None = None) -> None:
    """Refuse, naming the config field, what asyncpp does not build; called while the engine
    config is resolved, before any stage starts. `max_model_len` None: the model's own."""
    arch = architecture(hf_config)
    check_layer_types(hf_config)
    cls = MODELS[arch]
    check = getattr(cls, "check_config", None)
    if check is not None:
        check(hf_config)
    if not issubclass(cls, LlamaForCausalLM):
        return
    rope = rope_parameters(hf_config)
    phi3 = issubclass(cls, Phi3ForCausalLM)
    supported = PHI3_ROPE_TYPES if phi3 else STATIC_ROPE_TYPES
    if rope["rope_type"] not in supported:
        raise ValueError(f"{arch}: rope type {rope['rope_type']!r} (rope_parameters.rope_type) is not supported "
                         f"(supported: {', '.join(supported)})")
    if not phi3 and rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{arch}: partial rotary embeddings (partial_rotary_factor) are not supported")
    if rope["rope_type"] == "longrope":
        _check_longrope(arch, hf_config, rope, max_model_len or getattr(hf_config, "max_position_embeddings", 0))
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{arch}: hidden_act {act!r} is not supported (the MLP is SwiGLU: silu)")


def _check_longrope(arch: str, hf_config: Any, rope: dict[str, Any], max_model_len: int) -> None:
    """LongRoPE uses its short factors while a sequence stays within the original context and
    switches every position to its long factors past it (transformers recomputes the table
    per forward); only the first is one static table."""
    original = rope.get("original_max_position_embeddings") or getattr(hf_config, "original_max_position_embeddings", 0)
    if not original or max_model_len > original:
        raise ValueError(f"{arch}: rope type 'longrope' beyond original_max_position_embeddings ({original}) "
                         f"is not supported (its long factors); set max_model_len <= {original}")


def build_model(config: EngineConfig, stage: StageSpec, tp_group: TPGroup | None = None) -> nn.Module:
    """This rank's share of the model, weights loaded."""
    cls = MODELS[architecture(config.hf_config)]
    tp = tp_group or SingleRankGroup()
    with _default_dtype(config.dtype), torch.device(config.device):
        model = cls(config.hf_config, stage, tp, config.max_model_len, config.dtype)
    ckpt = Checkpoint.open(config.model_path)
    load_weights(model, ckpt, model.weight_plan(ckpt), desc=_loading_desc(stage),
                 position=stage.rank)
    if config.quantization or (config.onednn and onednn_available(config.device, config.dtype)):
        prepare_model(model, config.quantization)
    return model.eval()


def _loading_desc(stage: StageSpec) -> str:
    if stage.pp_size * stage.tp_size == 1:
        return "loading weights"
    tp = f", TP rank {stage.tp_rank + 1}/{stage.tp_size}" if stage.tp_size > 1 else ""
    return f"loading weights (stage {stage.pp_rank + 1}/{stage.pp_size}{tp})"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
