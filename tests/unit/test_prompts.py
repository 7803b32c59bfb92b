"""PromptResolver without an engine or a tokenizer: token-id prompts are sized before they
are read (1.5 M ids cost nothing), many ids are checked in a worker thread, the result is
the engine's own copy, and each refusal names its field."""
from __future__ import annotations

import pytest

from asyncpp.core.errors import InvalidRequest
from asyncpp.prompts import CHECK_IDS_INLINE, ChatPrompt, PromptResolver

pytestmark = pytest.mark.anyio
VOCAB = 100


async def refusal(resolver: PromptResolver, prompt) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        await resolver.resolve(prompt)
    return info.value


async def test_a_huge_id_list_is_refused_by_its_length_unread():
    ids = [1] * 1_500_000 + [-1]  # the bad id at the end would name itself if the list were read
    error = await refusal(PromptResolver(None, VOCAB, max_model_len=8192), {"prompt_token_ids": ids})
    assert error.param == "prompt" and str(error).startswith("prompt is 1500001 tokens long but max_model_len is 8192")


@pytest.mark.parametrize("length", [CHECK_IDS_INLINE, CHECK_IDS_INLINE * 2])  # checked inline, then in a thread
async def test_every_id_is_checked_and_the_engine_keeps_its_own_copy(length):
    resolver = PromptResolver(None, VOCAB, max_model_len=10 * CHECK_IDS_INLINE)
    error = await refusal(resolver, [1] * (length - 1) + [VOCAB])
    assert error.param == "prompt" and f"holds {VOCAB}, not a token id" in str(error)
    ids = [1] * length
    resolved = await resolver.resolve(ids)
    assert resolved.token_ids == ids and resolved.token_ids is not ids and resolved.text is None


async def test_text_and_chat_without_a_tokenizer_name_their_field():
    resolver = PromptResolver(None, VOCAB, max_model_len=64)
    assert (await refusal(resolver, "hello")).param == "prompt"
    assert (await refusal(resolver, ChatPrompt([{"role": "user", "content": "hi"}]))).param == "messages"
    assert (await refusal(resolver, {"prompt_token_ids": [1], "cache_salt": ""})).param == "cache_salt"
    assert (await resolver.resolve({"prompt_token_ids": [1], "cache_salt": "a"})).cache_salt == "a"
