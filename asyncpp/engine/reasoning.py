"""Reasoning models (`--reasoning-parser`, vLLM's names): the markers around their thinking,
and whether a prompt leaves the model thinking. Structured output applies once the reasoning
has ended (grammar_state.py); the server splits the text into reasoning and content
(server/reasoning.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ReasoningMarkers:
    start: str
    end: str


# Qwen3 and DeepSeek-R1 both think inside <think>...</think>; the template may write the
# opening tag into the prompt (R1) or leave it to the model (Qwen3).
REASONING_PARSERS = {"deepseek_r1": ReasoningMarkers("<think>", "</think>"),
                     "qwen3": ReasoningMarkers("<think>", "</think>")}


@dataclass(frozen=True, slots=True)
class ReasoningTokens:
    """The markers as token ids (one special token each in Qwen3's and R1's vocabularies)."""
    start: tuple[int, ...]
    end: tuple[int, ...]

    @classmethod
    def of(cls, markers: ReasoningMarkers, tokenizer: Any) -> ReasoningTokens:
        start, end = (tuple(tokenizer.encode(m, add_special_tokens=False)) for m in (markers.start, markers.end))
        return cls(start, end)

    def ended_in(self, token_ids: list[int]) -> bool:
        """Whether `token_ids` (a prompt) close their last reasoning: the end marker comes after
        the last start marker (as vLLM's is_reasoning_end)."""
        return _last(token_ids, self.end) > _last(token_ids, self.start)


def _last(ids: list[int], marker: tuple[int, ...]) -> int:
    """Where the last occurrence of `marker` in `ids` ends (-1: nowhere)."""
    n = len(marker)
    for end in range(len(ids), n - 1, -1):
        if ids[end - 1] == marker[-1] and tuple(ids[end - n:end]) == marker:
            return end
    return -1
