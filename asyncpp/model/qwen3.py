"""Qwen3: the Llama layers with an RMSNorm over each query and key head before rotary, and a
head_dim of its own (not hidden / heads)."""
from __future__ import annotations

from asyncpp.model.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
