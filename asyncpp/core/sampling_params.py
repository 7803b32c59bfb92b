"""Sampling parameters, named and validated as in vLLM."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from asyncpp.core.errors import InvalidRequest
from asyncpp.core.structured_outputs import StructuredOutputsParams

GREEDY_EPS = 1e-5  # a temperature below this samples greedily
_INT64_MAX = 2**63 - 1  # the sampler puts integer fields into int64 tensors


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # number of top logprobs per token besides the sampled one
    prompt_logprobs: int | None = None  # the same for each prompt token (besides the prompt's own)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # or a dict of its fields

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}", param=name)

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f.name, "must be a finite number")
            if isinstance(value, int) and abs(value) > _INT64_MAX:
                raise bad(f.name, "must fit in 64 bits")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be 0 or -1 (off) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise bad(name, "must be an integer >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")

    def verify_for_model(self, vocab_size: int, max_logprobs: int | None = None,
                         max_num_seqs: int | None = None) -> None:
        """Checks that need the model and the engine's limits: every token id the request names
        must exist, and it may ask for at most `max_logprobs` per token and `max_num_seqs` samples."""
        bad_ids = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad_ids:
            raise InvalidRequest(f"SamplingParams.stop_token_ids holds {bad_ids[0]}, not a token id in "
                                 f"[0, {vocab_size})", param="stop_token_ids")
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(self, name)
            if max_logprobs is not None and asked is not None and asked > max_logprobs:
                raise InvalidRequest(f"SamplingParams.{name} asks for {asked} per token; this engine allows at "
                                     f"most max_logprobs = {max_logprobs}", param=name)
        if max_num_seqs is not None and self.n > max_num_seqs:
            raise InvalidRequest(f"SamplingParams.n is {self.n}; this engine runs at most max_num_seqs = "
                                 f"{max_num_seqs} sequences at once", param="n")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1.0)
