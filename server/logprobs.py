"""Per-token logprobs in OpenAI's two shapes: the legacy completions one and chat's."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asyncpp.core.outputs import Logprob

if TYPE_CHECKING:  # transformers loads only with the engine's tokenizer
    from transformers import PreTrainedTokenizerBase


def _token_text(token_id: int, lp: Logprob, tokenizer: PreTrainedTokenizerBase | None) -> str:
    if lp.decoded_token is not None:
        return lp.decoded_token
    if tokenizer is not None:
        return tokenizer.decode([token_id])
    return f"token_id:{token_id}"


def _top(entries: dict[int, Logprob], limit: int) -> list[tuple[int, Logprob]]:
    """The `limit` most likely tokens (entries hold them plus the sampled one)."""
    return sorted(entries.items(), key=lambda item: -item[1].logprob)[:limit]


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], top: int,
                        tokenizer: PreTrainedTokenizerBase | None, text_offset: int = 0) -> dict[str, list]:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entries in zip(token_ids, logprobs):
        text = _token_text(token_id, entries[token_id], tokenizer)
        tokens.append(text)
        token_logprobs.append(entries[token_id].logprob)
        top_logprobs.append({_token_text(t, lp, tokenizer): lp.logprob for t, lp in _top(entries, top)}
                            if top else None)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def prompt_logprobs(entries: list[dict[int, Logprob] | None] | None) -> list[dict[str, dict] | None] | None:
    """vLLM's `prompt_logprobs`: by prompt position (None first), token id -> its logprob,
    rank and text."""
    if entries is None:
        return None
    def shown(lp: Logprob) -> dict[str, Any]:
        return {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}

    return [None if entry is None else {str(t): shown(lp) for t, lp in entry.items()} for entry in entries]


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], top: int,
                  tokenizer: PreTrainedTokenizerBase | None) -> dict[str, list]:
    def entry(token_id: int, lp: Logprob) -> dict[str, Any]:
        text = _token_text(token_id, lp, tokenizer)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode())}

    content = []
    for token_id, entries in zip(token_ids, logprobs):
        item = entry(token_id, entries[token_id])
        item["top_logprobs"] = [entry(t, lp) for t, lp in _top(entries, top)]
        content.append(item)
    return {"content": content}
