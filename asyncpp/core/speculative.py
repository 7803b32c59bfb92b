"""`speculative_config` (vLLM's name and keys): parsed and checked once, before any stage starts."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("ngram", "draft_model")
_KEYS = frozenset({"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                   "disable_by_batch_size", "model"})
# vLLM's n-gram default when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5
# Speculation pays while a step is bound by reading the weights; with many running sequences the
# verified positions cost compute the batch already spends. Per device: a CPU saturates its
# cores with a few tens of tokens per step, a GPU with hundreds.
DEFAULT_DISABLE_BY_BATCH_SIZE = {"cpu": 8, "cuda": 32}


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str  # "ngram" | "draft_model"
    num_speculative_tokens: int  # k: most tokens proposed per sequence and step
    prompt_lookup_min: int  # ngram: shortest suffix n-gram looked up in the sequence's own tokens
    prompt_lookup_max: int  # ngram: longest
    disable_by_batch_size: int  # no proposals while this many sequences run (the engine's, all VEs)
    model: str | None = None  # draft_model: the draft's checkpoint folder (same vocabulary as the target)


def parse_speculative_config(value: dict[str, Any] | str | None, device: str = "cpu") -> SpeculativeConfig | None:
    """The config from a dict or its JSON text (the command line's); None: no speculation.
    Raises ValueError naming the field at fault."""
    if value is None or value == "" or value == {}:
        return None
    raw = _as_dict(value)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"speculative_config has unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(sorted(_KEYS))}")
    # As vLLM: a model without a method is a draft model.
    method = raw.get("method") or ("draft_model" if raw.get("model") is not None else None)
    if method not in METHODS:
        raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}, got {method!r}")
    k = _positive("num_speculative_tokens", raw.get("num_speculative_tokens"))
    batch = _positive("disable_by_batch_size",
                      raw.get("disable_by_batch_size", DEFAULT_DISABLE_BY_BATCH_SIZE.get(device, 8)))
    if method == "draft_model":
        return SpeculativeConfig(method, k, 0, 0, batch, _draft_path(raw))
    if raw.get("model") is not None:
        raise ValueError(f"speculative_config.model is not used by method {method!r}; leave it out")
    low, high = (raw.get(name) for name in ("prompt_lookup_min", "prompt_lookup_max"))
    low = None if low is None else _positive("prompt_lookup_min", low)
    high = None if high is None else _positive("prompt_lookup_max", high)
    # As vLLM: one bound given stands for both, neither means 5.
    low = low or high or DEFAULT_PROMPT_LOOKUP
    high = high or low
    if low > high:
        raise ValueError(f"speculative_config.prompt_lookup_min ({low}) must be <= prompt_lookup_max ({high})")
    return SpeculativeConfig(method, k, low, high, batch)


def _draft_path(raw: dict[str, Any]) -> str:
    """The draft's folder, which must exist (what it holds is checked against the target later)."""
    for key in ("prompt_lookup_min", "prompt_lookup_max"):
        if raw.get(key) is not None:
            raise ValueError(f"speculative_config.{key} is used by method 'ngram' only; leave it out")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"speculative_config.model (the draft model's folder) is required, got {model!r}")
    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"speculative_config.model: {model!r} is not a model folder (no config.json there)")
    return model


def _as_dict(value: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config must be a JSON object, got {value!r} ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a JSON object (a dict), got {value!r}")
    return value


def _positive(name: str, value: Any) -> int:
    if value is None:
        raise ValueError(f"speculative_config.{name} is required")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"speculative_config.{name} must be an integer >= 1, got {value!r}")
    return value
