"""One rank's model: build and load its layers, hold its KV cache, run microbatches."""
from __future__ import annotations

import torch

from asyncpp.core.config import EngineConfig
from asyncpp.core.microbatch import IntermediateTensors, MicroBatch, PromptLogprobs, StepOutput, TensorSpec
from asyncpp.core.stages import StageSpec
from asyncpp.model import kernels
from asyncpp.model.attention import KVCache, allocate_kv_cache, allocate_latent_cache
from asyncpp.model.attention_metadata import HeadLayout, build_metadata
from asyncpp.model.gemm import quantized_bytes
from asyncpp.model.kv_quant import kv_format
from asyncpp.model.parallel import HeadSplit, SingleRankGroup, TPGroup
from asyncpp.model.registry import build_model
from asyncpp.model.sliding_window import stage_windows
from asyncpp.worker import verification
from asyncpp.worker.sampler import Sampler, prompt_logprobs

PROMPT_LOGITS_ELEMENTS = 2**24  # logits computed at once for prompt logprobs: 64 MiB of float32


class ModelRunner:
    def __init__(self, config: EngineConfig, stage: StageSpec, tp_group: TPGroup | None = None):
        self.config, self.stage = config, stage
        self.tp = tp_group or SingleRankGroup()
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # set by the stage process
        self.model = build_model(config, stage, self.tp)
        shape = config.shape
        heads = HeadSplit.of(shape.num_heads, shape.num_kv_heads, self.tp)
        latent = shape.latent is not None
        kernel = not latent and kernels.decode_kernel_fits(self.device, config.block_size, shape.head_dim)
        self.layout = HeadLayout(heads.q_local, heads.kv_local, shape.head_dim, config.block_size,
                                 kv_format(config.kv_cache_dtype), kernel, latent,
                                 stage_windows(config.hf_config, stage, config.max_model_len))
        self.kv_caches: list[list[KVCache]] = []  # [virtual engine][layer]
        self.sampler = Sampler(shape.vocab_size, base_seed=config.seed) if stage.is_last else None

    # -- sizes ------------------------------------------------------------------------
    def param_bytes(self) -> int:
        dense = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return dense + quantized_bytes(self.model)

    def num_available_blocks(self) -> int:
        if self.device.type != "cuda":
            # The CPU budget is for the whole model, so every rank reports the same count.
            return self.config.kv_cache_bytes // self.config.kv_bytes_per_block()
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * self.config.gpu_memory_utilization - (total - free) - self._activation_bytes()
        local_block = self.config.kv_bytes_per_block(self.stage.kv_layers, self.layout.num_kv_heads)
        return max(0, int(budget) // local_block)

    def _activation_bytes(self) -> int:
        """A generous bound on one step's temporaries: the widest per-token tensors and the logits."""
        shape, elem = self.config.shape, torch.finfo(self.config.dtype).bits // 8
        per_token = 4 * shape.hidden_size + 3 * shape.intermediate_size // self.tp.size
        rows = 1 + (self.config.speculative.num_speculative_tokens if self.config.speculative else 0)
        logits = self.config.max_num_seqs * rows * shape.vocab_size * 4 * 2
        return 2 * self.config.max_num_batched_tokens * per_token * elem + logits

    def init_kv_cache(self, num_virtual_engines: int, blocks_per_ve: int) -> None:
        self.kv_caches = [self._allocate(blocks_per_ve) for _ in range(num_virtual_engines)]

    def _allocate(self, num_blocks: int) -> list[KVCache]:
        lay, latent, dtype = self.layout, self.config.shape.latent, self.config.kv_cache_dtype
        if self.stage.kv_layers == 0:
            return []  # an MLP half alone, or no layer at all (the start-up profile's pieces)
        if latent is not None:
            return allocate_latent_cache(self.stage.kv_layers, num_blocks, lay.block_size, latent.cache_dim, dtype,
                                         self.device)
        return allocate_kv_cache(self.stage.kv_layers, num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim,
                                 dtype, self.device)

    def intermediate_spec(self, num_tokens: int) -> TensorSpec:
        shape = (num_tokens, self.config.shape.hidden_size)
        return {name: (shape, self.config.dtype) for name in self.model.intermediate_keys}

    # -- running ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, mb: MicroBatch, intermediate: IntermediateTensors | None
                ) -> IntermediateTensors | torch.Tensor:
        """Non-last stage: the tensors for the next stage. Last stage: float32 logits
        [sampled rows, vocab], in microbatch order (verification.sampling_rows)."""
        states = self._states(mb, intermediate)
        return states if not self.stage.is_last else self._logits(mb, states)

    def _states(self, mb: MicroBatch, intermediate: IntermediateTensors | None) -> IntermediateTensors:
        meta = build_metadata(mb.seqs, self.layout, self.device)
        input_ids = None
        if self.stage.is_first:
            ids = [t for s in mb.seqs for t in s.token_ids]
            input_ids = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        return self.model(input_ids, intermediate, self.kv_caches[mb.ve_id], meta)

    def _logits(self, mb: MicroBatch, states: IntermediateTensors) -> torch.Tensor:
        return self.model.compute_logits(states, self._sampling_rows(mb)).float()

    def _sampling_rows(self, mb: MicroBatch) -> torch.Tensor | None:
        """Rows of the last token of each sampling sequence (and of its proposals); None when
        that is every row."""
        rows = verification.sampling_rows(mb.seqs)
        if len(rows) == mb.num_tokens:
            return None
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, mb: MicroBatch, intermediate: IntermediateTensors | None
                ) -> IntermediateTensors | StepOutput:
        states = self._states(mb, intermediate)
        if not self.stage.is_last:
            return states
        specs = verification.row_specs(mb.seqs)
        out = self.sampler(self._logits(mb, states), specs, mb.token_bitmask) if specs else StepOutput([])
        if any(s.num_proposed for s in mb.seqs):
            out = verification.accept(out, mb.seqs)
        if any(s.prompt_logprobs is not None for s in mb.seqs):
            out.prompt_logprobs = self._prompt_logprobs(mb, states)
        return out

    def _prompt_logprobs(self, mb: MicroBatch, states: IntermediateTensors) -> dict[int, PromptLogprobs]:
        """For each sequence that asks: the logits of its chunk's rows that predict a prompt
        token, a slice of rows at a time (a whole chunk's would be tokens x vocab floats)."""
        out: dict[int, PromptLogprobs] = {}
        start = 0
        for index, seq in enumerate(mb.seqs):
            spec = seq.prompt_logprobs
            if spec is not None:
                rows = torch.arange(start, start + len(spec.targets))
                step = max(1, PROMPT_LOGITS_ELEMENTS // self.config.shape.vocab_size)
                parts = [prompt_logprobs(self.model.compute_logits(states, rows[i:i + step].to(self.device)).float(),
                                         spec.targets[i:i + step], spec.num, self.config.shape.vocab_size)
                         for i in range(0, len(rows), step)]
                out[index] = PromptLogprobs([v for p in parts for v in p.logprobs], [r for p in parts for r in p.ranks],
                                            [t for p in parts for t in p.top])
            start += seq.num_tokens
        return out
