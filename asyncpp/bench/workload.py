"""Workload W: its model (a random Llama, built once in the cache) and its token-id prompts;
the MoE workload: the same shape with a Qwen3-MoE model."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from asyncpp.model.default_model import cache_dir

WORKLOAD_DIR_NAME = "w-llama"
MOE_WORKLOAD_DIR_NAME = "w-qwen3-moe"


def default_workload_dir(name: str = WORKLOAD_DIR_NAME) -> Path:
    """<asyncpp cache>/bench/w-llama; the cache honours $ASYNCPP_CACHE_DIR and $XDG_CACHE_HOME."""
    return cache_dir() / "bench" / name


def make_workload_model(path: str | Path | None = None) -> Path:
    """Workload W's model: a random 8-layer Llama (hidden 512, 8 heads, vocab 32000), fp32.

    Built once with a fixed seed and reused."""
    path = Path(path) if path is not None else default_workload_dir()
    return publish_folder(path, _save_workload_model, is_complete=_has_weights)


def _has_weights(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def _save_workload_model(out_dir: Path) -> None:
    # transformers' model classes take seconds to import; only a first build needs them.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=2048, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.2)  # sharp logits: greedy near-ties would make parity noisy
    LlamaForCausalLM(config).to(torch.float32).eval().save_pretrained(out_dir, safe_serialization=True)


def make_moe_workload_model(path: str | Path | None = None) -> Path:
    """The MoE workload's model: a random Qwen3-MoE shaped as W (8 layers, hidden 512, 8
    heads, vocab 32000), every layer 16 experts of intermediate 512, top-2, fp32; in the
    published per-expert layout. Built once with a fixed seed and reused."""
    path = Path(path) if path is not None else default_workload_dir(MOE_WORKLOAD_DIR_NAME)
    return publish_folder(path, _save_moe_workload_model, is_complete=_has_weights)


def _save_moe_workload_model(out_dir: Path) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, moe_intermediate_size=512,
                            num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=8, head_dim=64, max_position_embeddings=2048,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    model = Qwen3MoeForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # decisive routing: no near-tie between a token's 2nd and 3rd experts
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(4)
    model.save_pretrained(out_dir, safe_serialization=True)  # published layout: experts.N.gate_proj ...
    # transformers < 5 (vLLM pins one) reads `num_experts` and `rope_theta`, which 5 writes
    # as `num_local_experts` and inside `rope_parameters`; write both spellings.
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(num_experts=16, rope_theta=cfg["rope_parameters"]["rope_theta"])
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


WORKLOADS: dict[str, Callable[[], Path]] = {"w": make_workload_model, "moe": make_moe_workload_model}


def publish_folder(path: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """`path`, written by `write` unless already complete. `write` fills a temporary folder
    beside `path`, which is then renamed into place, so no reader ever sees a half-written
    folder; when two processes race, the first rename wins and the other discards its copy."""
    if is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache folder is an ordinary one
        write(staging)
        _rename_into_place(staging, path, is_complete)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return path


def _rename_into_place(staging: Path, path: Path, is_complete: Callable[[Path], bool]) -> None:
    try:
        os.rename(staging, path)
    except OSError:  # path exists: a racing process finished first, or a damaged folder
        if is_complete(path):
            return
        shutil.rmtree(path, ignore_errors=True)
        os.rename(staging, path)


def make_prompts(count: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts with lengths uniform in [min_len, max_len], ids clear of 0..2 (pad/bos/eos)."""
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(count)]
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]
