"""The resolved configuration every process works from, and the model's sizes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from asyncpp.core.stages import StageCosts, StageSpec

# The decode step the default partition balances: this many sequences with this much
# context each (workload W's shape). Bytes moved per step stand for time: decode is bound
# by reading weights and KV, and per layer these bytes matched the measured stage times.
COST_SEQS = 32
COST_CONTEXT = 256


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The sizes every part derives from, read once from the Hugging Face config
    (GPT-2's names are aliases there: n_embd is hidden_size, n_head num_attention_heads)."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    gated_mlp: bool  # gate, up and down projections (Llama) rather than two (GPT-2)
    # Mixture-of-Experts (Qwen3-MoE, Mixtral): the layers whose MLP half is a sparse MoE block
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()

    @classmethod
    def of(cls, hf_config: Any) -> "ModelShape":
        c = hf_config
        inner = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size
        max_positions = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048
        return cls(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                   num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                   intermediate_size=inner, vocab_size=c.vocab_size, max_positions=max_positions,
                   gated_mlp=getattr(c, "intermediate_size", None) is not None, **_moe_fields(c, inner))

    def stage_costs(self, elem_bytes: int) -> StageCosts:
        """Bytes each part reads and writes in one decode step of COST_SEQS sequences."""
        h, d = self.hidden_size, self.head_dim
        attention = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        kv = COST_SEQS * COST_CONTEXT * 2 * self.num_kv_heads * d
        head = self.vocab_size * h + COST_SEQS * self.vocab_size  # weights, then the logits
        mlps = [self.moe_cost() if i in self.moe_layers else mlp for i in range(self.num_layers)]
        uniform = len(set(mlps)) == 1
        return StageCosts(attention=(attention + kv) * elem_bytes, mlp=mlps[0] * elem_bytes,
                          first=COST_SEQS * h * elem_bytes, last=head * elem_bytes,
                          layer_mlp=() if uniform else tuple(m * elem_bytes for m in mlps))

    def moe_cost(self) -> float:
        """Elements an MoE layer reads in a decode step of COST_SEQS tokens: the router and the
        experts those tokens pick; with each token choosing k of E at random, the expected
        number of distinct experts is E * (1 - (1 - k/E)^N). (Its memory is all E experts.)"""
        e, k = self.num_experts, self.experts_per_token
        active = e * (1 - (1 - k / e) ** COST_SEQS)
        return e * self.hidden_size + active * 3 * self.hidden_size * self.expert_intermediate_size


def _moe_fields(c: Any, inner: int) -> dict[str, Any]:
    """Qwen3-MoE: `num_experts`, `moe_intermediate_size`, dense MLPs in `mlp_only_layers` and
    off every `decoder_sparse_step`-th layer; Mixtral: `num_local_experts`, every layer sparse."""
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or 0
    top_k = getattr(c, "num_experts_per_tok", None) or 0
    if not experts or not top_k:
        return {}
    dense, step = set(getattr(c, "mlp_only_layers", None) or ()), getattr(c, "decoder_sparse_step", None) or 1
    return {"num_experts": experts, "experts_per_token": top_k,
            "expert_intermediate_size": getattr(c, "moe_intermediate_size", None) or inner,
            "moe_layers": tuple(i for i in range(c.num_hidden_layers) if i not in dense and (i + 1) % step == 0)}


@dataclass(slots=True)
class EngineConfig:
    """Everything resolved once in the engine process from EngineArgs and the checkpoint,
    and shipped to every rank. Runtime code reads these fields only."""
    model_path: str
    served_model_name: str
    tokenizer_path: str | None
    hf_config: Any  # transformers.PretrainedConfig: the model classes read their own fields
    shape: ModelShape
    dtype: torch.dtype
    kv_cache_dtype: torch.dtype  # the model's dtype, or an 8-bit float stored with a scale
    quantization: str | None  # None | "int8": weights quantized while loading
    device: str  # "cpu" | "cuda"
    seed: int
    max_model_len: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_prefill_tokens_while_decoding: int  # prompt tokens in a microbatch while any sequence decodes
    enable_chunked_prefill: bool
    enable_prefix_caching: bool
    cache_aware_routing: bool  # requests go to the VE caching their prefix (else least loaded)
    max_waiting_requests: int
    kv_cache_bytes: int  # CPU: the KV budget of the whole model
    gpu_memory_utilization: float
    num_virtual_engines: int
    max_in_flight_per_ve: int  # microbatches one VE keeps in the pipeline
    decode_groups: int  # a VE spreads its decoding sequences over this many microbatches (ceil(P / V))
    layer_partition: list[float]  # layers per stage; x.5: split after a layer's attention
    backend: str  # "uni" | "mp" | "ray"
    threads_per_rank: int
    tp_comm: str  # "auto" | "shm" | "gloo"
    pp_comm: str  # "auto" | "shm" | "gloo"
    onednn: bool  # prepacked oneDNN GEMMs on CPU (fp32, bf16)
    stage_timeout_s: float  # the watchdog: a stage silent this long with work pending is hung (0: off)
    max_stage_restarts: int  # within stage_restart_window_s
    stage_restart_window_s: float
    eos_token_ids: list[int] = field(default_factory=list)
    max_logprobs: int = 20  # most logprobs a request may ask for per token
    stages: list[StageSpec] = field(default_factory=list)
    ray_address: str | None = None  # the Ray cluster to join (ray backend); None: a private local Ray

    def kv_bytes_per_block(self, num_layers: int | None = None, num_kv_heads: int | None = None) -> int:
        """One KV block of `num_layers` layers (default: all) and `num_kv_heads` heads (default: all)."""
        layers = self.shape.num_layers if num_layers is None else num_layers
        heads = self.shape.num_kv_heads if num_kv_heads is None else num_kv_heads
        elem = torch.finfo(self.kv_cache_dtype).bits // 8
        return 2 * layers * self.block_size * heads * self.shape.head_dim * elem

    def stage(self, rank: int) -> StageSpec:
        return self.stages[rank]

    @property
    def world_size(self) -> int:
        return len(self.stages)

    @property
    def max_in_flight_total(self) -> int:
        """Microbatches in the pipeline at once, all VEs together."""
        return self.num_virtual_engines * self.max_in_flight_per_ve
