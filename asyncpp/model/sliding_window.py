"""Which layers attend through a sliding window, read from the Hugging Face config.

transformers' rule (masking_utils.sliding_window_overlay): a query at position q attends to
the keys k with q - window < k <= q, the `window` newest positions including its own. So
each query needs one number, the first position it reads: max(0, q - window + 1).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from asyncpp.core.stages import StageSpec

LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(hf_config: Any, max_model_len: int | None = None) -> list[int | None]:
    """Each layer's window (None: full attention). A window no context can outgrow
    (>= max_model_len) is full attention."""
    n = hf_config.num_hidden_layers
    types = check_layer_types(hf_config)
    if types is not None and len(types) != n:
        raise ValueError(f"layer_types has {len(types)} entries for {n} layers (num_hidden_layers)")
    window = getattr(hf_config, "sliding_window", None)
    if getattr(hf_config, "use_sliding_window", True) is False:
        window = None
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window must be a positive integer, not {window!r}")
    if window is None or (max_model_len is not None and window >= max_model_len):
        return [None] * n
    if types is None:
        return [window] * n
    return [window if t == "sliding_attention" else None for t in types]


def check_layer_types(hf_config: Any) -> list[str] | None:
    """The config's layer_types (None: not given, or ignored as transformers' Mistral does),
    refusing any type this package does not build."""
    if getattr(hf_config, "model_type", "") == "mistral":
        return None  # transformers' Mistral windows every layer, whatever layer_types says
    types = getattr(hf_config, "layer_types", None)
    unknown = sorted(set(types or ()) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported (supported: {', '.join(LAYER_TYPES)})")
    return types


def stage_windows(hf_config: Any, stage: StageSpec, max_model_len: int) -> tuple[int, ...]:
    """The distinct windows among the layers whose attention runs on `stage`."""
    windows = layer_windows(hf_config, max_model_len)[stage.layer_start:stage.layer_end]
    if stage.mlp_only_first:
        windows = windows[1:]
    return tuple(sorted({w for w in windows if w is not None}))


def first_positions(query: np.ndarray | int, window: int) -> np.ndarray:
    """The first position each query reads, for queries at positions `query`."""
    return np.maximum(np.asarray(query) - window + 1, 0)
