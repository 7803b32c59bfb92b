"""Prompt forms users may pass: text, token ids, or vLLM-style dicts."""
from __future__ import annotations

from typing import Any, Union

from asyncpp.core.errors import InvalidRequest

PromptInput = Union[str, list[int], dict[str, Any]]


def resolve_prompt(prompt: PromptInput, tokenizer: Any, vocab_size: int) -> tuple[str | None, list[int]]:
    """(text or None, token ids), validated."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return _check_ids(prompt["prompt_token_ids"], vocab_size, prompt.get("prompt"))
        if "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise InvalidRequest("a dict prompt needs 'prompt' or 'prompt_token_ids'", param="prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt is empty", param="prompt")
        if tokenizer is None:
            raise InvalidRequest("text prompts need a tokenizer (the engine runs with "
                                 "skip_tokenizer_init=True): pass {'prompt_token_ids': [...]}", param="prompt")
        return _check_ids(tokenizer.encode(prompt), vocab_size, prompt)
    if isinstance(prompt, (list, tuple)):
        return _check_ids(list(prompt), vocab_size, None)
    raise InvalidRequest(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}",
                         param="prompt")


def cache_salt(prompt: PromptInput) -> str | None:
    """A dict prompt's `cache_salt` (vLLM's field): only prompts with the same salt share
    cached KV, so one tenant cannot probe another's prompts through cache timing."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise InvalidRequest("cache_salt must be a non-empty string", param="cache_salt")
    return salt


def _check_ids(ids: Any, vocab_size: int, text: str | None) -> tuple[str | None, list[int]]:
    ids = list(ids)
    if not ids:
        raise InvalidRequest("prompt is empty (no tokens)", param="prompt")
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise InvalidRequest(f"prompt_token_ids holds {t!r}, not a token id in [0, {vocab_size})",
                                 param="prompt")
    return text, ids
