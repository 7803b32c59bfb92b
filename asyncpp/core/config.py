"""The resolved configuration every process works from, and the model's sizes."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from asyncpp.core.speculative import SpeculativeConfig
from asyncpp.core.stages import StageCosts, StageSpec, partition_layers, stage_specs

# The decode step the default partition balances: this many sequences with this much
# context each (workload W's shape). Bytes moved per step stand for time: decode is bound
# by reading weights and KV, and per layer these bytes matched the measured stage times.
COST_SEQS = 32
COST_CONTEXT = 256


@dataclass(frozen=True, slots=True)
class LatentShape:
    """Multi-head latent attention (DeepSeek-V2/V3): the cache holds, per token and layer, one
    latent vector (`kv_lora_rank`) and the rotary part of the key (`qk_rope_head_dim`), shared
    by every head, instead of per-head K and V."""
    q_lora_rank: int  # 0: a plain q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def cache_dim(self) -> int:
        """Elements one token's cache entry holds in one layer."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def weights(self, hidden: int, heads: int) -> int:
        """Elements of one layer's attention weights."""
        m, q_out = self, heads * self.qk_head_dim
        q = (hidden + q_out) * m.q_lora_rank if m.q_lora_rank else hidden * q_out
        kv = hidden * m.cache_dim + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + heads * m.v_head_dim * hidden


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
    shared_expert_intermediate_size: int = 0  # DeepSeek: shared experts beside the routed ones, in every MoE layer
    latent: LatentShape | None = None  # multi-head latent attention (DeepSeek-V2/V3)

    @classmethod
    def of(cls, hf_config: Any) -> "ModelShape":
        c = hf_config
        inner = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size
        max_positions = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048
        return cls(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                   num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                   intermediate_size=inner, vocab_size=c.vocab_size, max_positions=max_positions,
                   gated_mlp=getattr(c, "intermediate_size", None) is not None, latent=_latent(c),
                   **_moe_fields(c, inner))

    def stage_costs(self, elem_bytes: int) -> StageCosts:
        """Bytes each part reads and writes in one decode step of COST_SEQS sequences."""
        h, d = self.hidden_size, self.head_dim
        attention = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        if self.latent is not None:
            attention = self.latent.weights(h, self.num_heads)
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        kv = COST_SEQS * COST_CONTEXT * self.kv_elements_per_token
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
        inner = active * self.expert_intermediate_size + self.shared_expert_intermediate_size
        return e * self.hidden_size + 3 * self.hidden_size * inner

    @property
    def kv_elements_per_token(self) -> int:
        """Cache elements one token takes in one layer: K and V of every KV head, or MLA's latent entry."""
        if self.latent is not None:
            return self.latent.cache_dim
        return 2 * self.num_kv_heads * self.head_dim


def _latent(c: Any) -> LatentShape | None:
    if not getattr(c, "kv_lora_rank", None):
        return None
    return LatentShape(q_lora_rank=getattr(c, "q_lora_rank", None) or 0, kv_lora_rank=c.kv_lora_rank,
                       qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
                       v_head_dim=c.v_head_dim)


def _moe_fields(c: Any, inner: int) -> dict[str, Any]:
    """Qwen3-MoE: `num_experts`, `moe_intermediate_size`, dense MLPs in `mlp_only_layers` and
    off every `decoder_sparse_step`-th layer; Mixtral: `num_local_experts`, every layer sparse;
    DeepSeek: `n_routed_experts`, the first `first_k_dense_replace` layers dense, and
    `n_shared_experts` shared experts of `moe_intermediate_size` each."""
    experts = (getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
               or getattr(c, "n_routed_experts", None) or 0)
    top_k = getattr(c, "num_experts_per_tok", None) or 0
    if not experts or not top_k:
        return {}
    dense, step = set(getattr(c, "mlp_only_layers", None) or ()), getattr(c, "decoder_sparse_step", None) or 1
    dense |= set(range(getattr(c, "first_k_dense_replace", None) or 0))
    expert_inner = getattr(c, "moe_intermediate_size", None) or inner
    return {"num_experts": experts, "experts_per_token": top_k, "expert_intermediate_size": expert_inner,
            "shared_expert_intermediate_size": (getattr(c, "n_shared_experts", None) or 0) * expert_inner,
            "moe_layers": tuple(i for i in range(c.num_hidden_layers) if i not in dense and (i + 1) % step == 0)}


@dataclass(frozen=True, slots=True)
class RebalanceSettings:
    """--pp-rebalance: live moves of layer halves between stages (engine/rebalancer.py)."""
    enabled: bool = False
    window_s: float = 10.0
    threshold: float = 0.10


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
    adaptive_prefill_budget: bool  # that share follows measured step costs (engine/prompt_budget.py)
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
    rebalance: RebalanceSettings = field(default_factory=RebalanceSettings)
    # CPU, all stages on this host: torch threads a rank may use for a microbatch that is alone in
    # the pipeline (its stage then runs while the others wait); 0: always threads_per_rank
    solo_threads: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    max_logprobs: int = 20  # most logprobs a request may ask for per token
    stages: list[StageSpec] = field(default_factory=list)
    ray_address: str | None = None  # the Ray cluster to join (ray backend); None: a private local Ray
    # how layer_partition was chosen: "auto" (measured stage times), "cost" (estimated from bytes),
    # "given"; "" for one stage
    layer_partition_source: str = ""
    # prompt tokens : generated tokens per request that `auto` and --pp-rebalance balance the stages for
    partition_mix: tuple[float, float] = (1.0, 1.0)
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding

    def kv_bytes_per_block(self, num_layers: int | None = None, num_kv_heads: int | None = None) -> int:
        """One KV block of `num_layers` layers (default: all) and `num_kv_heads` heads (default:
        all). A latent (MLA) cache has no heads: every TP rank holds the whole entry."""
        layers = self.shape.num_layers if num_layers is None else num_layers
        per_token = self.shape.kv_elements_per_token
        if num_kv_heads is not None and self.shape.latent is None:
            per_token = per_token * num_kv_heads // self.shape.num_kv_heads
        elem = torch.finfo(self.kv_cache_dtype).bits // 8
        return layers * self.block_size * per_token * elem

    def with_partition(self, parts: Sequence[float]) -> EngineConfig:
        """The same engine with another split (a live re-balancing move); checked as a given one."""
        first = self.stages[0]
        checked = partition_layers(self.shape.num_layers, first.pp_size, list(parts))
        return replace(self, layer_partition=checked, stages=stage_specs(checked, first.pp_size, first.tp_size))

    def stage(self, rank: int) -> StageSpec:
        return self.stages[rank]

    @property
    def world_size(self) -> int:
        return len(self.stages)

    @property
    def max_in_flight_total(self) -> int:
        """Microbatches in the pipeline at once, all VEs together."""
        return self.num_virtual_engines * self.max_in_flight_per_ve
