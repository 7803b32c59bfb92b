"""Incremental detokenization: one generated token in, the new text out, O(1) per token.

Built on `tokenizers.decoders.DecodeStream`, which keeps a short window of recent ids, decodes
only that window, and holds text back while it ends in an incomplete UTF-8 character. The
stream is primed with a few prompt tokens, so the first generated token decodes in context:
SentencePiece tokenizers then keep its leading space (" Paris", not "Paris"), as vLLM does.
"""
from __future__ import annotations

import logging
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
_INVALID_PREFIX_ERROR = "Invalid prefix encountered"
_MIN_CONTEXT_TOKENS = 4
_MAX_CONTEXT_TOKENS = 24


def backend_tokenizer(tokenizer: Any) -> Tokenizer:
    """The Rust `tokenizers.Tokenizer` behind a Hugging Face tokenizer (or the tokenizer itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend; "
                        "asyncpp needs a tokenizer.json")
    return backend


def prompt_context(backend: Tokenizer, prompt_token_ids: list[int]) -> list[int]:
    """The shortest prompt suffix (up to 24 tokens) that decodes to whole characters, else [].

    A context that decodes with a broken character would make the stream emit it as output.
    """
    shortest = min(len(prompt_token_ids), _MIN_CONTEXT_TOKENS)
    for length in range(shortest, min(len(prompt_token_ids), _MAX_CONTEXT_TOKENS) + 1):
        suffix = prompt_token_ids[len(prompt_token_ids) - length:]
        if _REPLACEMENT_CHAR not in backend.decode(suffix, skip_special_tokens=False):
            return list(suffix)
    return []


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, a delta per token."""

    __slots__ = ("_backend", "_skip_special_tokens", "_stream", "text")

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._backend = backend_tokenizer(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        context = prompt_context(self._backend, prompt_token_ids)
        self._stream = DecodeStream(ids=context or None, skip_special_tokens=skip_special_tokens)
        self.text = ""

    def append(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while a character is partial)."""
        delta = self._step(token_id) or ""
        self.text += delta
        return delta

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as exc:
            # Some byte sequences decode non-monotonically and break the stream's window
            # (vllm-project/vllm#17448); restart it without context rather than fail the request.
            if _INVALID_PREFIX_ERROR not in str(exc):
                raise
            logger.warning("restarting incremental detokenization after: %s", exc)
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            return self._stream.step(self._backend, token_id)
