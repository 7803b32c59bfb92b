"""Engine arguments (one validated dataclass: CLI flags, LLM keywords, server settings)
and the resolved configuration every process works from."""
from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from asyncpp.core.stages import StageSpec, layer_ranges, partition_layers

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_BACKENDS = ("uni", "mp", "ray")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6,
               "mib": 2**20, "g": 1e9, "gb": 1e9, "gib": 2**30}


def parse_bytes(value: str | int | float) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"kv_cache_memory must be a size such as '2GiB' or '512MiB', got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _arg(default: Any, help: str, **kw: Any) -> Any:
    meta = {"help": help}
    if "choices" in kw:
        meta["choices"] = kw.pop("choices")
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(slots=True)
class EngineArgs:
    model: str | None = _arg(None, "Hugging Face model folder; none: the bundled SmolLM2-135M-Instruct")
    tokenizer: str | None = _arg(None, "tokenizer folder (default: the model folder)")
    skip_tokenizer_init: bool = _arg(False, "no tokenizer: token ids in, token ids out")
    served_model_name: str | None = _arg(None, "model name the server answers to (default: the model path)")
    dtype: str = _arg("auto", "float32 | float16 | bfloat16 | auto (float32 on CPU, the checkpoint's on GPU)")
    device: str = _arg("auto", "cpu | cuda | auto (cuda when every rank can have its own GPU)")
    seed: int = _arg(0, "base seed for unseeded sampling")
    max_model_len: int | None = _arg(None, "longest prompt + output (default: the model's context length)")
    block_size: int = _arg(16, "tokens per KV-cache block")
    max_num_seqs: int = _arg(128, "most sequences in one microbatch")
    max_num_batched_tokens: int | None = _arg(None, "most tokens in one microbatch (default 2048 with chunked prefill)")
    enable_chunked_prefill: bool = _arg(True, "split long prompts across steps and mix them with decodes")
    kv_cache_memory: str = _arg("2GiB", "KV-cache memory on CPU, for the whole model (e.g. 512MiB, 4GiB)")
    gpu_memory_utilization: float = _arg(0.9, "fraction of GPU memory for weights and KV cache")
    pipeline_parallel_size: int = _arg(1, "pipeline stages (P)")
    tensor_parallel_size: int = _arg(1, "tensor-parallel ranks inside a stage (T)")
    distributed_executor_backend: str | None = _arg(None, "uni | mp | ray (default: uni for one rank, else mp)",
                                                    choices=[None, *_BACKENDS])
    num_virtual_engines: int | None = _arg(None, "virtual engines (V), each with its own scheduler (default P)")
    pp_layer_partition: str | None = _arg(None, "layers per stage, e.g. 8,8,7,7 (default even)")
    max_waiting_requests: int = _arg(4096, "bounded waiting queue; beyond it requests are refused")
    num_threads: int | None = _arg(None, "torch threads per rank (default cores // ranks)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "pipeline_parallel_size", "tensor_parallel_size", "num_virtual_engines",
                     "max_waiting_requests", "num_threads"):
            positive(name)
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.distributed_executor_backend not in (None, *_BACKENDS):
            raise ValueError(f"distributed_executor_backend must be one of {_BACKENDS}, "
                             f"got {self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "uni" and self.world_size > 1:
            raise ValueError("distributed_executor_backend='uni' runs one rank; use 'mp' or 'ray' "
                             f"for pipeline_parallel_size * tensor_parallel_size = {self.world_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        parse_bytes(self.kv_cache_memory)

    @property
    def world_size(self) -> int:
        return self.pipeline_parallel_size * self.tensor_parallel_size

    # -- command line ---------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, model_positional: bool = True) -> None:
        for f in fields(cls):
            if f.name == "model":
                if model_positional:
                    parser.add_argument("model", nargs="?", default=None, help=f.metadata["help"])
                parser.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not MISSING else None
            kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata.get("help")}
            if isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, int) or f.name in _INT_FLAGS:
                kwargs["type"] = int
            elif isinstance(default, float):
                kwargs["type"] = float
            if "choices" in f.metadata:
                kwargs["choices"] = [c for c in f.metadata["choices"] if c is not None]
            parser.add_argument(flag, **kwargs)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        values["model"] = getattr(ns, "model_flag", None) or getattr(ns, "model", None)
        return cls(**values)


_INT_FLAGS = {"max_model_len", "max_num_batched_tokens", "num_virtual_engines", "num_threads"}


@dataclass(slots=True)
class EngineConfig:
    """Everything resolved once in the engine process and shipped to every rank."""
    args: EngineArgs
    model_path: str
    tokenizer_path: str | None
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    device: str
    max_model_len: int
    max_num_batched_tokens: int
    num_virtual_engines: int
    layer_partition: list[int]
    backend: str
    eos_token_ids: list[int]
    threads_per_rank: int
    stages: list[StageSpec] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return sum(self.layer_partition)

    @property
    def kv_heads(self) -> int:
        c = self.hf_config
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def kv_bytes_per_block(self, num_layers: int | None = None) -> int:
        layers = self.num_layers if num_layers is None else num_layers
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * layers * self.args.block_size * self.kv_heads * self.head_dim * elem

    def stage(self, rank: int) -> StageSpec:
        return self.stages[rank]


def _resolve_device(args: EngineArgs) -> str:
    if args.device != "auto":
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available")
        return args.device
    return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= args.world_size else "cpu"


def _resolve_dtype(args: EngineArgs, hf_config: Any, device: str) -> torch.dtype:
    if args.dtype != "auto":
        return _DTYPES[args.dtype]
    if device == "cpu":
        return torch.float32
    ckpt = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    ckpt = getattr(torch, ckpt) if isinstance(ckpt, str) else ckpt
    return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.bfloat16


def _eos_ids(model_path: Path, hf_config: Any) -> list[int]:
    ids: list[int] = []
    for source in (_generation_config_eos(model_path), getattr(hf_config, "eos_token_id", None)):
        if source is None:
            continue
        for i in (source if isinstance(source, (list, tuple)) else [source]):
            if i not in ids:
                ids.append(int(i))
    return ids


def _generation_config_eos(model_path: Path) -> Any:
    path = model_path / "generation_config.json"
    if not path.exists():
        return None
    import json
    return json.loads(path.read_text()).get("eos_token_id")


def create_engine_config(args: EngineArgs) -> EngineConfig:
    from transformers import AutoConfig

    from asyncpp.model.default_model import resolve_model_path
    from asyncpp.model.registry import check_supported

    model_path = resolve_model_path(args.model)
    hf_config = AutoConfig.from_pretrained(model_path)
    check_supported(hf_config)
    device = _resolve_device(args)
    dtype = _resolve_dtype(args, hf_config, device)
    max_pos = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", 2048)
    max_model_len = args.max_model_len or max_pos
    if max_model_len > max_pos:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {max_pos}")
    batched = args.max_num_batched_tokens or (2048 if args.enable_chunked_prefill else max(2048, max_model_len))
    if not args.enable_chunked_prefill and batched < max_model_len:
        raise ValueError(f"max_num_batched_tokens ({batched}) must be >= max_model_len ({max_model_len}) "
                         "when chunked prefill is off")
    pp, tp = args.pipeline_parallel_size, args.tensor_parallel_size
    check_tensor_parallel(hf_config, tp)
    parts = partition_layers(hf_config.num_hidden_layers, pp, args.pp_layer_partition)
    stages = [StageSpec(p, pp, t, tp, start, end)
              for p, (start, end) in enumerate(layer_ranges(parts)) for t in range(tp)]
    tokenizer_path = None if args.skip_tokenizer_init else str(args.tokenizer or model_path)
    return EngineConfig(
        args=args, model_path=str(model_path), tokenizer_path=tokenizer_path, hf_config=hf_config,
        dtype=dtype, device=device, max_model_len=max_model_len, max_num_batched_tokens=batched,
        num_virtual_engines=args.num_virtual_engines or pp, layer_partition=parts,
        backend=args.distributed_executor_backend or ("uni" if args.world_size == 1 else "mp"),
        eos_token_ids=_eos_ids(Path(model_path), hf_config),
        threads_per_rank=_threads_per_rank(args, device), stages=stages)


def check_tensor_parallel(hf_config: Any, tp: int) -> None:
    """Fail at start, naming the constraint, when T cannot split the model's layers.
    (The vocabulary needs no check: embedding and LM head pad it to a multiple of T.)"""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    inner = (getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None)
             or 4 * hf_config.hidden_size)
    if heads % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide num_attention_heads ({heads}): "
                         "every rank holds the same number of query heads")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp}) and num_key_value_heads ({kv_heads}) must divide "
                         "one another: KV heads are split across ranks, or each rank keeps one")
    if inner % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide the MLP's intermediate size ({inner})")


def _threads_per_rank(args: EngineArgs, device: str) -> int:
    """Torch threads per rank: cores // ranks. More ranks than cores still runs (one thread
    each, sharing cores), with a warning: that layout is for testing, not for speed."""
    cores, ranks = available_cores(), args.world_size
    threads = args.num_threads or max(1, cores // ranks)
    if device == "cpu" and threads * ranks > cores:
        logging.getLogger("asyncpp").warning(
            "%d ranks x %d thread(s) on %d cores: the ranks share cores (oversubscribed); expect "
            "a slower engine than fewer ranks would give", ranks, threads, cores)
    return threads


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
