"""Checks of a request against what this engine can ever serve, made before any tokenizing:
each refusal is a 400 naming the field."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asyncpp.server.errors import ServerError
from asyncpp.server.settings import PROMPT_CHARS_PER_TOKEN


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_model_len: int
    max_logprobs: int
    max_num_seqs: int
    max_waiting_requests: int

    @classmethod
    def of(cls, config: Any) -> RequestLimits:
        return cls(config.max_model_len, config.max_logprobs, config.max_num_seqs, config.max_waiting_requests)

    @property
    def max_prompt_chars(self) -> int:
        return PROMPT_CHARS_PER_TOKEN * self.max_model_len

    def check_text(self, text: str, param: str) -> None:
        """Refuses text that cannot fit max_model_len tokens, before a tokenizer spends time on it."""
        if len(text) > self.max_prompt_chars:
            raise ServerError(400, f"{param} is {len(text)} characters long, far more than max_model_len "
                                   f"({self.max_model_len} tokens) can hold: at most {self.max_prompt_chars} "
                                   "characters are taken", param)

    def check_prompt_count(self, count: int) -> None:
        if count > self.max_waiting_requests:
            raise ServerError(400, f"prompt holds {count} prompts, more than this server's waiting queue "
                                   f"(--max-waiting-requests {self.max_waiting_requests}) can ever hold", "prompt")

    def check_n(self, n: int) -> None:
        if n > self.max_num_seqs:
            raise ServerError(400, f"n is {n}; this server runs at most --max-num-seqs {self.max_num_seqs} "
                                   "sequences at once", "n")

    def check_logprobs(self, count: int | None, param: str) -> None:
        if count is not None and count > self.max_logprobs:
            raise ServerError(400, f"{param} is {count}; this server returns at most --max-logprobs "
                                   f"{self.max_logprobs} per token", param)
