"""Engine arguments (one validated dataclass: CLI flags, LLM keywords, server settings)
and their resolution, with the checkpoint, into the EngineConfig every process works from."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from asyncpp.auto_partition import measured_partition
from asyncpp.core.config import COST_SEQS, EngineConfig, ModelShape, RebalanceSettings
from asyncpp.core.speculative import SpeculativeConfig, parse_speculative_config
from asyncpp.core.stages import StageSpec, format_partition, partition_layers, stage_specs
from asyncpp.engine.draft_config import check_draft_model
from asyncpp.engine.reasoning import REASONING_PARSERS
from asyncpp.model.default_model import DEFAULT_MODEL_NAME, resolve_model_path
from asyncpp.model.registry import check_supported

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
log = logging.getLogger("asyncpp")

_BACKENDS = ("uni", "mp", "ray")
# vLLM's names: "fp8" is e4m3, the format with the mantissa bits KV values need.
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e5m2": torch.float8_e5m2}
QUANTIZATIONS = ("int8",)
_COMM = ("auto", "shm", "gloo")
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
    model: str | None = _arg(None, f"Hugging Face model folder; none: the bundled {DEFAULT_MODEL_NAME}")
    tokenizer: str | None = _arg(None, "tokenizer folder (default: the model folder)")
    skip_tokenizer_init: bool = _arg(False, "no tokenizer: token ids in, token ids out")
    served_model_name: str | None = _arg(None, "model name the server answers to (default: the model path)")
    dtype: str = _arg("auto", "float32 | float16 | bfloat16 | auto (the checkpoint's, as vLLM: float16 runs as "
                      "bfloat16 on CPU, float32 as bfloat16 on GPU)")
    kv_cache_dtype: str = _arg("auto", "KV-cache element type: auto (the model's dtype) | fp8 (= fp8_e4m3) | "
                               "fp8_e5m2: 8-bit, scaled per tensor, dequantized in attention",
                               choices=list(KV_CACHE_DTYPES))
    quantization: str | None = _arg(None, "weight quantization at load time from an ordinary checkpoint: int8 "
                                    "(per-output-channel int8 weights; CPU)", choices=[None, *QUANTIZATIONS])
    device: str = _arg("auto", "cpu | cuda | auto (cuda when every rank can have its own GPU)")
    seed: int = _arg(0, "base seed for unseeded sampling")
    max_model_len: int | None = _arg(None, "longest prompt + output (default: the model's context length)")
    block_size: int = _arg(16, "tokens per KV-cache block")
    max_num_seqs: int = _arg(128, "most sequences in one microbatch")
    max_num_batched_tokens: int | None = _arg(None, "token budget of one microbatch: decodes first, prompt chunks "
                                              "fill the rest (default with chunked prefill: 512 on CPU, 256 on "
                                              "CPU at P > 1, 2048 on GPU; at least max_model_len without)")
    max_prefill_tokens_while_decoding: int | None = _arg(
        None, "prompt tokens in one microbatch while any sequence is decoding, so the streams behind it are "
        "not held up long (default: 128 on CPU, 32 on CPU at P > 1, 512 on GPU; at most --max-num-batched-tokens)")
    adaptive_prefill_budget: bool = _arg(
        False, "let measured step costs and the oldest prompt's wait set that share once fitted (off by default: "
        "measured behind the fixed cap in serving, see README)")
    enable_chunked_prefill: bool = _arg(True, "split long prompts across steps and mix them with decodes")
    enable_prefix_caching: bool = _arg(True, "keep the KV of full blocks after their requests end and share it "
                                       "with later requests that start with the same tokens")
    # The flag keeps its first name; inside the engine this is request routing (engine/router.py).
    cache_aware_placement: bool = _arg(True, "route a request to the virtual engine caching its longest prefix "
                                       "unless that one is overloaded (--no-cache-aware-placement: least loaded)")
    kv_cache_memory: str = _arg("2GiB", "KV-cache memory on CPU, for the whole model (e.g. 512MiB, 4GiB)")
    gpu_memory_utilization: float = _arg(0.9, "fraction of GPU memory for weights and KV cache")
    pipeline_parallel_size: int = _arg(1, "pipeline stages (P)")
    tensor_parallel_size: int = _arg(1, "tensor-parallel ranks inside a stage (T)")
    distributed_executor_backend: str | None = _arg(None, "uni | mp | ray (default: uni for one rank, else mp)",
                                                    choices=[None, *_BACKENDS])
    ray_address: str | None = _arg(None, "with --distributed-executor-backend ray: the Ray cluster to join "
                                   "(host:port of its head, or 'auto'; default $RAY_ADDRESS); without either, "
                                   "a private local Ray is started, without a dashboard")
    num_virtual_engines: int | None = _arg(None, "virtual engines (V), each with its own scheduler (default P)")
    max_microbatches_in_flight: int | None = _arg(None, "microbatches one virtual engine keeps in the pipeline "
                                                  "at once (default P)")
    pp_layer_partition: str | None = _arg(
        "auto", "layers per stage: auto (from each piece's time measured at start-up on the stage's threads, "
                "cached per model, layout and host) | cost (balanced by an estimate from bytes) | counts, e.g. "
                "8,8,7,7; x.5 splits a layer after its attention, e.g. 4.5,3.5")
    pp_partition_mix: str = _arg(
        "1:1", "prompt:generated tokens per request that --pp-layer-partition auto (and --pp-rebalance's "
               "predictions) balance the stages for: 1:1 a chat turn; e.g. 20:1 where long prompts with short "
               "answers dominate (the split then evens out prefill), 1:4 for long generations")
    pp_rebalance: bool = _arg(False, "re-balance the split while serving: when the busiest stage stays more than "
                              "--pp-rebalance-threshold above the mean for a window, move layer halves to its "
                              "less busy neighbour, as many as the busy fractions say balance the two (the "
                              "pipeline pauses, the two stages rebuild in place, running requests re-prefill)")
    pp_rebalance_window: float = _arg(10.0, "with --pp-rebalance: seconds of busy fractions behind each decision")
    pp_rebalance_threshold: float = _arg(0.10, "with --pp-rebalance: how far above the mean busy fraction the "
                                         "busiest stage must be to move layer halves (0.10: 10 percent)")
    max_waiting_requests: int = _arg(4096, "bounded waiting queue; beyond it requests are refused")
    max_logprobs: int = _arg(20, "most logprobs a request may ask for per token")
    speculative_config: dict[str, Any] | str | None = _arg(
        None, "speculative decoding, as vLLM: a JSON object such as '{\"method\": \"ngram\", "
        "\"num_speculative_tokens\": 4, \"prompt_lookup_min\": 2, \"prompt_lookup_max\": 4}' "
        "(optional \"disable_by_batch_size\": no proposals while that many sequences run), or a draft model "
        "with the target's tokenizer: '{\"model\": \"/path/to/draft\", \"num_speculative_tokens\": 4}'")
    num_threads: int | None = _arg(None, "torch threads per rank (default cores // ranks)")
    solo_stage_threads: bool = _arg(
        True, "CPU, stages in local processes: a microbatch alone in the pipeline runs each stage on the cores "
        "of every stage (they wait meanwhile), and a light load (under 16 sequences) is kept in one such "
        "microbatch")
    tp_comm: str = _arg("auto", "TP all-reduce: auto (shared memory between CPU ranks of one machine, "
                        "else gloo/NCCL) | shm (insist) | gloo (always the world's library)", choices=_COMM)
    pp_comm: str = _arg("auto", "stage-to-stage tensors: auto | shm | gloo, as --tp-comm", choices=_COMM)
    stage_timeout: float = _arg(300.0, "seconds a stage may go without answering while it has work before it "
                                "counts as hung and the stages restart (0: never)")
    max_stage_restarts: int = _arg(3, "stage restarts allowed within --stage-restart-window; past that the engine "
                                   "stays down (0: a failed stage ends the engine)")
    stage_restart_window: float = _arg(600.0, "seconds over which --max-stage-restarts counts")
    onednn: bool = _arg(True, "prepacked oneDNN GEMMs on CPU for float32 and bfloat16 models (--no-onednn: F.linear)")
    reasoning_parser: str | None = _arg(None, "the model thinks inside <think>...</think> (deepseek_r1 | qwen3): "
                                        "structured output applies after the reasoning, and the server answers "
                                        "it as reasoning_content", choices=[None, *REASONING_PARSERS])
    structured_outputs_timeout: float = _arg(10.0, "seconds a request's grammar (JSON schema, regex, EBNF, tools) "
                                             "may take to compile; past it the request is refused")
    structured_outputs_max_chars: int = _arg(65536, "longest JSON schema, regex or grammar a request may bring, in "
                                             "characters")
    structured_outputs_max_whitespace: int = _arg(20, "most whitespace characters between two JSON tokens under a "
                                                  "JSON schema or json_object (as llama.cpp bounds it: a sampling "
                                                  "model may otherwise loop on newlines); 0: none (compact JSON, "
                                                  "as vLLM's disable_any_whitespace); -1: any number, as vLLM")
    structured_outputs_cache_size: int = _arg(256, "compiled grammars kept for later requests (least recently "
                                              "used go first)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "pipeline_parallel_size", "tensor_parallel_size", "num_virtual_engines",
                     "max_microbatches_in_flight", "max_waiting_requests", "num_threads",
                     "max_prefill_tokens_while_decoding", "structured_outputs_max_chars",
                     "structured_outputs_cache_size"):
            positive(name)
        if self.structured_outputs_max_whitespace < -1:
            raise ValueError("structured_outputs_max_whitespace must be >= 0, or -1 for any number, got "
                             f"{self.structured_outputs_max_whitespace!r}")
        if not self.structured_outputs_timeout > 0:
            raise ValueError(f"structured_outputs_timeout must be positive, got {self.structured_outputs_timeout!r}")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)} (or none), "
                             f"got {self.reasoning_parser!r}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or none); "
                             f"got {self.quantization!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        for name in ("tp_comm", "pp_comm"):
            if getattr(self, name) not in _COMM:
                raise ValueError(f"{name} must be one of {', '.join(_COMM)}, got {getattr(self, name)!r}")
        if self.distributed_executor_backend not in (None, *_BACKENDS):
            raise ValueError(f"distributed_executor_backend must be one of {_BACKENDS}, "
                             f"got {self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "uni" and self.world_size > 1:
            raise ValueError("distributed_executor_backend='uni' runs one rank; use 'mp' or 'ray' "
                             f"for pipeline_parallel_size * tensor_parallel_size = {self.world_size}")
        if self.ray_address and self.distributed_executor_backend != "ray":
            raise ValueError("ray_address joins a Ray cluster: it needs distributed_executor_backend='ray', "
                             f"got {self.distributed_executor_backend!r}")
        parse_partition_mix(self.pp_partition_mix)
        if self.pp_rebalance_window <= 0 or self.pp_rebalance_threshold < 0:
            raise ValueError("pp_rebalance_window must be > 0 and pp_rebalance_threshold >= 0, got "
                             f"{self.pp_rebalance_window!r} and {self.pp_rebalance_threshold!r}")
        for name in ("stage_timeout", "stage_restart_window", "max_stage_restarts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        parse_bytes(self.kv_cache_memory)
        parse_speculative_config(self.speculative_config)

    @property
    def world_size(self) -> int:
        return self.pipeline_parallel_size * self.tensor_parallel_size

    # -- command line ---------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, model_positional: bool = True) -> None:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name == "model":
                if model_positional:
                    parser.add_argument("model", nargs="?", default=None, help=f.metadata["help"])
                parser.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not MISSING else None
            kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata.get("help")}
            kind = _value_type(hints[f.name])
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif kind in (int, float):
                kwargs["type"] = kind
            if "choices" in f.metadata:
                kwargs["choices"] = [c for c in f.metadata["choices"] if c is not None]
            parser.add_argument(flag, **kwargs)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        values["model"] = getattr(ns, "model_flag", None) or getattr(ns, "model", None)
        return cls(**values)


def _value_type(hint: Any) -> type:
    """`int | None` -> int: the type a flag's text converts to."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _resolve_device(args: EngineArgs) -> str:
    if args.device != "auto":
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available")
        return args.device
    return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= args.world_size else "cpu"


def _resolve_dtype(args: EngineArgs, hf_config: Any, device: str) -> torch.dtype:
    """vLLM's "auto": the checkpoint's dtype (float32 when it names none), except float16 on
    CPU, which runs as bfloat16 (CPU kernels for float16 are slow or missing), and float32
    on GPU, which runs as bfloat16 (as vLLM downcasts it there)."""
    if args.dtype != "auto":
        return _DTYPES[args.dtype]
    ckpt = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    ckpt = getattr(torch, ckpt) if isinstance(ckpt, str) else ckpt
    if ckpt not in (torch.float32, torch.float16, torch.bfloat16):
        ckpt = torch.float32
    if device == "cpu":
        return torch.bfloat16 if ckpt == torch.float16 else ckpt
    return torch.bfloat16 if ckpt == torch.float32 else ckpt


def _resolve_quantization(args: EngineArgs, device: str) -> str | None:
    if args.quantization is not None and device != "cpu":
        raise ValueError(f"--quantization {args.quantization} runs on CPU only (its GEMM is fbgemm's int8)")
    return args.quantization


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
    return json.loads(path.read_text()).get("eos_token_id")


def create_engine_config(args: EngineArgs) -> EngineConfig:
    model_path = resolve_model_path(args.model)
    hf_config = AutoConfig.from_pretrained(model_path)
    check_supported(hf_config, args.max_model_len)  # first: a config it cannot even read is named
    shape = ModelShape.of(hf_config)
    device = _resolve_device(args)
    max_model_len = args.max_model_len or shape.max_positions
    if max_model_len > shape.max_positions:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {shape.max_positions}")
    batched = args.max_num_batched_tokens or _default_budget(device, args.enable_chunked_prefill, max_model_len,
                                                             args.pipeline_parallel_size)
    while_decoding = min(batched, args.max_prefill_tokens_while_decoding
                         or _default_prefill_while_decoding(device, args.pipeline_parallel_size))
    if not args.enable_chunked_prefill:
        while_decoding = batched  # whole prompts only
    if not args.enable_chunked_prefill and batched < max_model_len:
        raise ValueError(f"max_num_batched_tokens ({batched}) must be >= max_model_len ({max_model_len}) "
                         "when chunked prefill is off")
    pp, tp = args.pipeline_parallel_size, args.tensor_parallel_size
    ves = args.num_virtual_engines or pp
    speculative = parse_speculative_config(args.speculative_config, device)
    if speculative is not None and speculative.model is not None:
        check_draft_model(speculative, hf_config, max_model_len)
    check_tensor_parallel(shape, tp)
    dtype = _resolve_dtype(args, hf_config, device)
    kv_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype] or dtype
    mode = partition_mode(args.pp_layer_partition)
    parts = partition_layers(shape.num_layers, pp, args.pp_layer_partition if mode == "given" else None,
                             shape.stage_costs(torch.finfo(dtype).bits // 8))
    threads = _threads_per_rank(args, device, _draft_beside_stages(speculative, ves, pp, args))
    backend = args.distributed_executor_backend or ("uni" if args.world_size == 1 else "mp")
    config = EngineConfig(
        model_path=str(model_path), served_model_name=args.served_model_name or str(args.model or DEFAULT_MODEL_NAME),
        tokenizer_path=None if args.skip_tokenizer_init else str(args.tokenizer or model_path),
        hf_config=hf_config, shape=shape, dtype=dtype, kv_cache_dtype=kv_dtype,
        quantization=_resolve_quantization(args, device), device=device,
        seed=args.seed, max_model_len=max_model_len, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=batched, max_prefill_tokens_while_decoding=while_decoding,
        adaptive_prefill_budget=args.adaptive_prefill_budget and args.enable_chunked_prefill,
        enable_chunked_prefill=args.enable_chunked_prefill, enable_prefix_caching=args.enable_prefix_caching,
        cache_aware_routing=args.cache_aware_placement,
        max_waiting_requests=args.max_waiting_requests, kv_cache_bytes=parse_bytes(args.kv_cache_memory),
        gpu_memory_utilization=args.gpu_memory_utilization, num_virtual_engines=ves,
        max_in_flight_per_ve=args.max_microbatches_in_flight or pp, decode_groups=-(-pp // ves),
        layer_partition=parts, layer_partition_source=mode if pp > 1 else "",
        partition_mix=parse_partition_mix(args.pp_partition_mix),
        backend=backend, threads_per_rank=threads,
        solo_threads=_solo_threads(args.solo_stage_threads and device == "cpu" and backend == "mp", pp, tp, threads),
        tp_comm=args.tp_comm, pp_comm=args.pp_comm,
        onednn=args.onednn, stage_timeout_s=args.stage_timeout, max_stage_restarts=args.max_stage_restarts,
        stage_restart_window_s=args.stage_restart_window,
        rebalance=RebalanceSettings(args.pp_rebalance and pp > 1, args.pp_rebalance_window,
                                    args.pp_rebalance_threshold),
        eos_token_ids=_eos_ids(Path(model_path), hf_config),
        stages=_stages(parts, pp, tp), max_logprobs=args.max_logprobs,
        speculative=speculative,
        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS") or None)
    return _with_measured_partition(config) if mode == "auto" and pp > 1 else _logged(config)


PARTITION_MODES = ("auto", "cost")


def parse_partition_mix(value: str) -> tuple[float, float]:
    """'prompt:generated', e.g. '20:1' -> (20.0, 1.0)."""
    prompt, colon, output = str(value).partition(":")
    try:
        mix = (float(prompt), float(output)) if colon else None
    except ValueError:
        mix = None
    if mix is None or min(mix) < 0 or max(mix) <= 0 or not all(map(math.isfinite, mix)):
        raise ValueError(f"pp_partition_mix must be 'prompt:generated' token counts >= 0, not both 0 "
                         f"(e.g. 1:1, 20:1), got {value!r}")
    return mix


def partition_mode(value: str | None) -> str:
    """"auto" (None too), "cost", or "given" for explicit layer counts."""
    if not value:
        return "auto"
    return value if isinstance(value, str) and value in PARTITION_MODES else "given"


def _stages(parts: list[float], pp: int, tp: int) -> list[StageSpec]:
    return stage_specs(parts, pp, tp)


def _with_measured_partition(config: EngineConfig) -> EngineConfig:
    """The split from measured stage times; the estimate's (already in `config`) when profiling fails."""
    choice = measured_partition(config)
    if choice is None:
        return _logged(replace(config, layer_partition_source="cost"))
    pp, tp = config.stages[0].pp_size, config.stages[0].tp_size
    return replace(config, layer_partition=choice.parts, stages=_stages(choice.parts, pp, tp))


def _logged(config: EngineConfig) -> EngineConfig:
    """Log a given or estimated split, with each stage's estimated cost."""
    if len(config.layer_partition) > 1:
        costs = config.shape.stage_costs(torch.finfo(config.dtype).bits // 8).of(config.layer_partition)
        how = "given" if config.layer_partition_source == "given" else "balanced by estimated cost"
        log.info("layer partition %s (%s); estimated MiB moved per decode step of %d sequences, by stage: %s",
                 format_partition(config.layer_partition), how, COST_SEQS,
                 ", ".join(f"{c / 2**20:.1f}" for c in costs))
    return config


# A microbatch's token budget bounds how long it holds up the decodes behind it: while any
# stream is decoding, a microbatch's prompt chunk should cost about a decode step, not
# seconds; with no stream waiting, larger chunks keep prefill efficient and still pipeline a
# long prompt over the stages. Measured per device (README, "Latency-bounded microbatches").
DEFAULT_BUDGET = {"cpu": 512, "cuda": 2048}
DEFAULT_PREFILL_WHILE_DECODING = {"cpu": 128, "cuda": 512}
# At P > 1 a microbatch holds up the decodes of every virtual engine on every stage it
# crosses. Serving SmolLM2 on 2 cores (benchmarks/serve_vs_vllm.py): at P=1, 128 gave 117
# tok/s and ITL p50/p99 169/398 ms where 32 gave 89 tok/s (prompts trickled in, the batch
# ran half empty); at P=2, 32 kept ITL p99 at 2.5x p50 where 64 let it reach 4x.
PIPELINED_CPU_PREFILL_WHILE_DECODING = 32


# A long prompt's chunks fill the pipeline and drain from it one chunk at a time: smaller
# chunks shorten the drain. Measured on W at P=2 (one 2,000-token prompt): 256-token chunks
# 0.94x the time of 512-token ones on the default split (benchmarks/long_prompt.py).
PIPELINED_CPU_BUDGET = 256


def _default_prefill_while_decoding(device: str, pp: int) -> int:
    if device == "cpu" and pp > 1:
        return PIPELINED_CPU_PREFILL_WHILE_DECODING
    return DEFAULT_PREFILL_WHILE_DECODING[device]


def _default_budget(device: str, chunked_prefill: bool, max_model_len: int, pp: int) -> int:
    if not chunked_prefill:
        return max(DEFAULT_BUDGET[device], max_model_len)
    return PIPELINED_CPU_BUDGET if device == "cpu" and pp > 1 else DEFAULT_BUDGET[device]


def check_tensor_parallel(shape: ModelShape, tp: int) -> None:
    """Fail at start, naming the constraint, when T cannot split the model's layers.
    (The vocabulary needs no check: embedding and LM head pad it to a multiple of T.)"""
    heads, kv_heads, inner = shape.num_heads, shape.num_kv_heads, shape.intermediate_size
    if heads % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide num_attention_heads ({heads}): "
                         "every rank holds the same number of query heads")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp}) and num_key_value_heads ({kv_heads}) must divide "
                         "one another: KV heads are split across ranks, or each rank keeps one")
    if inner % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide the MLP's intermediate size ({inner})")
    if shape.expert_intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size ({tp}) must divide the experts' intermediate size "
                         f"({shape.expert_intermediate_size}): every rank holds a slice of every expert")


def _draft_beside_stages(speculative: SpeculativeConfig | None, ves: int, pp: int, args: EngineArgs) -> bool:
    """Whether a draft model runs while stages work: unless one VE keeps one microbatch in flight,
    it drafts while other microbatches are in the pipeline (with one, draft and stages take turns)."""
    if speculative is None or speculative.model is None:
        return False
    return ves * (args.max_microbatches_in_flight or pp) > 1


def _threads_per_rank(args: EngineArgs, device: str, draft_beside: bool = False) -> int:
    """Torch threads per rank: cores // ranks. More ranks than cores still runs (one thread
    each, sharing cores), with a warning: that layout is for testing, not for speed. A draft
    model that runs beside the stages counts as one more rank (engine/draft_runner.py)."""
    cores = available_cores()
    ranks = args.world_size + int(draft_beside)
    threads = args.num_threads or max(1, cores // ranks)
    if device == "cpu" and threads * ranks > cores:
        log.warning(
            "%d ranks x %d thread(s) on %d cores: the ranks share cores (oversubscribed); expect "
            "a slower engine than fewer ranks would give", ranks, threads, cores)
    return threads


def _solo_threads(wanted: bool, pp: int, tp: int, threads: int) -> int:
    """Threads a rank may use while its microbatch is alone in a pipeline of one host's CPU
    processes (`wanted`): the cores the other stages' ranks would use then idle (0: no more
    than `threads`)."""
    if not wanted or pp == 1:
        return 0
    solo = min(available_cores() // tp, threads * pp)
    return solo if solo > threads else 0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
