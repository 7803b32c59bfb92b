"""The tiny random checkpoints (built by asyncpp.testing.tiny_model), and what a stage should load from them."""
from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

from asyncpp.core.stages import StageSpec
from asyncpp.model.attention import PagedAttention
from asyncpp.model.embedding import VocabParallelEmbedding
from asyncpp.model.linear import ColumnParallelLinear, RowParallelLinear
from asyncpp.model.moe import SparseMoeBlock
from asyncpp.testing.tiny_model import (
    VOCAB,
    make_deepseek_v3,
    make_gemma2,
    make_gemma3,
    make_gpt2,
    make_gpt_oss,
    make_llama,
    make_llama_draft,
    make_mistral_swa,
    make_mixtral,
    make_phi3,
    make_qwen2_swa,
    make_qwen3,
    make_qwen3_moe,
)
from asyncpp.worker.model_runner import ModelRunner
from helpers.driver import engine_config

__all__ = ["GEMMA_ATTENTION_HALF", "TINY_LLAMA_BLOCK_BYTES", "VOCAB", "checkpoint_share", "expected_rank_bytes",
           "make_deepseek_v3", "make_gemma2", "make_gemma3", "make_gpt2", "make_gpt_oss", "make_llama",
           "make_llama_draft", "make_mistral_swa", "make_mixtral", "make_phi3", "make_qwen2_swa", "make_qwen3",
           "make_qwen3_moe"]

# KV bytes per block of the tiny models: 2 (K,V) * 4 layers * 16 tokens * 2 heads * 16 dims * 4 B.
TINY_LLAMA_BLOCK_BYTES = 2 * 4 * 16 * 2 * 16 * 4


_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_FIRST = ("embed_tokens", "wte", "wpe")
_LAST = ("model.norm", "ln_f", "lm_head")
_ATTENTION_HALF = ("self_attn.", "input_layernorm", ".attn.", ".ln_1.")
# Gemma normalises the attention output before the residual add: that norm goes with the attention.
GEMMA_ATTENTION_HALF = (*_ATTENTION_HALF, "post_attention_layernorm")


def checkpoint_share(model_dir: Path, stage: StageSpec, tied: bool,
                     attention_half: tuple[str, ...] = _ATTENTION_HALF) -> int:
    """Parameter bytes a stage should load: its layers, the embedding on the first, the
    final norm and head on the last (a tied head counts the embedding there again).
    `attention_half`: the names of a split layer's weights that stay with its attention."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for name in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                t = f.get_slice(name)
                size = _nbytes(t.get_shape(), t.get_dtype())
                m = _LAYER.search(name)
                if m:
                    total += size if _held(stage, int(m.group(1)), name, attention_half) else 0
                elif any(k in name for k in _FIRST):
                    owners = stage.is_first or (tied and stage.is_last and "wpe" not in name)
                    total += size if owners else 0
                elif any(k in name for k in _LAST):
                    total += size if stage.is_last else 0
    return total


def expected_rank_bytes(model_dir: Path, pp: int, tp: int, partition: str | None = None) -> list[int]:
    """Per global rank: what a T = 1 stage holds, with the TP-split tensors divided by T
    (norms, position embeddings and row-parallel biases stay whole on every rank)."""
    config = engine_config(model_dir, pipeline_parallel_size=pp, pp_layer_partition=partition)
    expected = []
    for stage in config.stages:
        model, seen = ModelRunner(config, stage).model, set()
        split = whole = 0
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                nbytes = p.numel() * p.element_size()
                sharded = isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)) or (
                    isinstance(module, RowParallelLinear) and name == "weight") or (
                    isinstance(module, PagedAttention) and name == "sinks") or (  # per query head
                    isinstance(module, SparseMoeBlock) and name.startswith("packed_"))  # experts' slices, packed
                split, whole = (split + nbytes, whole) if sharded else (split, whole + nbytes)
        assert split % tp == 0
        expected += [whole + split // tp] * tp
    return expected


def _held(stage: StageSpec, layer: int, name: str, attention_half: tuple[str, ...]) -> bool:
    """Whether a layer's weight is on the stage: a split layer's attention half (and its
    norm) stays on the earlier stage, its MLP half goes to the later one."""
    if not stage.layer_start <= layer < stage.layer_end:
        return False
    attention, mlp = stage.parts(layer - stage.layer_start)
    return attention if any(k in name for k in attention_half) else mlp


def _nbytes(shape: list[int], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * {"F32": 4, "F16": 2, "BF16": 2}[dtype]
