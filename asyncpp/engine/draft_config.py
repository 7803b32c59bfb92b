"""The draft model of draft-model speculation: checked against the target while the engine
config is resolved (before any stage starts), and its own EngineConfig, derived from the target's."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from transformers import AutoConfig

from asyncpp.core.config import EngineConfig, ModelShape, RebalanceSettings
from asyncpp.core.speculative import SpeculativeConfig
from asyncpp.core.stages import StageSpec
from asyncpp.model.registry import check_supported

FIELD = "speculative_config.model"


def check_draft_model(spec: SpeculativeConfig, target_hf: Any, max_model_len: int) -> Any:
    """The draft's Hugging Face config, once it is known to load, to be an architecture asyncpp
    builds, to propose only token ids the target has (the same tokenizer; a vocabulary padded
    differently is fine) and to reach max_model_len. Raises ValueError naming the field."""
    assert spec.model is not None
    try:
        hf = AutoConfig.from_pretrained(spec.model)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the user's field is at fault
        raise ValueError(f"{FIELD}: {spec.model!r} does not load as a model config: {e}") from e
    try:
        check_supported(hf, max_model_len)
    except ValueError as e:
        raise ValueError(f"{FIELD} ({spec.model}): {e}") from e
    shape = ModelShape.of(hf)
    if shape.vocab_size > target_hf.vocab_size:
        raise ValueError(f"{FIELD}: the draft's vocab_size ({shape.vocab_size}) exceeds the target's "
                         f"({target_hf.vocab_size}); the draft must share the target's tokenizer")
    if shape.max_positions < max_model_len:
        raise ValueError(f"{FIELD}: the draft's context ({shape.max_positions} positions) is shorter than "
                         f"max_model_len ({max_model_len})")
    return hf


def draft_engine_config(target: EngineConfig) -> EngineConfig:
    """The draft's config: every layer in one stage, the target's dtype, block size and limits,
    unquantized, no speculation of its own."""
    spec = target.speculative
    assert spec is not None and spec.model is not None
    hf = AutoConfig.from_pretrained(spec.model)
    shape = ModelShape.of(hf)
    stage = StageSpec(pp_rank=0, pp_size=1, tp_rank=0, tp_size=1, layer_start=0, layer_end=shape.num_layers)
    return replace(target, model_path=spec.model, served_model_name=spec.model, hf_config=hf, shape=shape,
                   kv_cache_dtype=target.dtype, quantization=None, layer_partition=[float(shape.num_layers)],
                   layer_partition_source="", stages=[stage], backend="uni", speculative=None,
                   rebalance=RebalanceSettings())
