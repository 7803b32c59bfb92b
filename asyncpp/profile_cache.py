"""The start-up profile's cache: one JSON file per model, precision, layout and host under the
asyncpp cache dir, so the next start with the same ones reuses it and any other re-profiles."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from asyncpp.core.config import EngineConfig
from asyncpp.core.stage_profile import TimingTable
from asyncpp.model.default_model import cache_dir

PROFILE_FORMAT = 1  # bump when what is measured, or how, changes
log = logging.getLogger("asyncpp")


def profile_key(config: EngineConfig, threads: int) -> dict[str, Any]:
    """Everything a stage's times depend on: the model (its folder and its config), the
    precision, the layout and the threads a stage gets, the step shapes, and the host."""
    model = Path(config.model_path).resolve()
    pp, tp = config.stages[0].pp_size, config.stages[0].tp_size
    return {"format": PROFILE_FORMAT, "model": str(model),
            "config_sha256": _sha256((model / "config.json").read_bytes()),
            "dtype": str(config.dtype), "kv_cache_dtype": str(config.kv_cache_dtype),
            "quantization": config.quantization, "onednn": config.onednn, "device": config.device,
            "pp": pp, "tp": tp, "threads_per_stage": threads, "block_size": config.block_size,
            "max_num_seqs": config.max_num_seqs, "max_model_len": config.max_model_len,
            "max_num_batched_tokens": config.max_num_batched_tokens, "torch": torch.__version__,
            "host": host_id(config.device)}


def host_id(device: str) -> dict[str, str]:
    """The CPU's model and a digest of its feature flags (and the GPU's name on a GPU)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            if field.strip() == "model name" and not flags:
                name = value.strip()
            elif field.strip() in ("flags", "Features"):
                flags = value.strip()
                break
    except OSError:
        pass
    host = {"cpu": name, "cpu_flags": _sha256(flags.encode())[:16]}
    if device == "cuda":
        host["gpu"] = torch.cuda.get_device_name(0)
    return host


def profile_path(key: dict[str, Any]) -> Path:
    digest = _sha256(json.dumps(key, sort_keys=True).encode())[:24]
    return cache_dir() / "stage-profiles" / f"{digest}.json"


def load_profile(key: dict[str, Any]) -> TimingTable | None:
    """The cached table for `key`; None when there is none or it cannot be read."""
    path = profile_path(key)
    try:
        data = json.loads(path.read_text())
        return TimingTable.from_json(data["table"]) if data["key"] == key else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("stage profile %s unreadable (%s): measuring again", path, exc)
        return None


def store_profile(key: dict[str, Any], table: TimingTable) -> Path | None:
    """Write the table for `key` (atomically); None when the cache dir is not writable."""
    path = profile_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": key, "table": table.to_json()}, indent=1))
        os.replace(partial, path)
    except OSError as exc:
        log.warning("stage profile not cached (%s): the next start measures again", exc)
        return None
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
