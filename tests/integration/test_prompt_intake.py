"""The engine's one way in for a prompt, through the SDK: text and chat messages are
tokenized (and rendered) off the event loop, giving the ids transformers gives, and a 20 MB
text is refused before any tokenizing, the loop ticking all along."""
from __future__ import annotations

import threading

import anyio
import pytest
from transformers import AutoTokenizer

from asyncpp import AsyncLLM, SamplingParams
from asyncpp.core.errors import InvalidRequest
from asyncpp.core.outputs import RequestOutput
from asyncpp.prompts import ChatPrompt

pytestmark = pytest.mark.anyio
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
STUCK_S = 60  # only a loop that never ticks waits this long: the test then fails, it does not hang


class Ticker:
    """A coroutine beside the request that counts its turns on the event loop."""

    def __init__(self) -> None:
        self.ticks = 0
        self.ticked = threading.Event()

    async def run(self) -> None:
        while True:
            await anyio.sleep(0)
            self.ticks += 1
            if self.ticks >= 3:
                self.ticked.set()


def encode_after_ticks(encode, ticker: Ticker, calls: list[str]):
    """The tokenizer's encode, made to wait for the ticker: on the event loop it would wait for ever."""
    def encode_(text: str, **kwargs):
        calls.append(text)
        assert ticker.ticked.wait(STUCK_S), "tokenizing held up the event loop"
        return encode(text, **kwargs)
    return encode_


async def last_output(llm: AsyncLLM, prompt, ticker: Ticker) -> RequestOutput:
    """The request's final output; its prompt resolved while `ticker` ran beside it."""
    refused: InvalidRequest | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        try:
            stream = await llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=2))
        except InvalidRequest as exc:
            refused = exc
        tg.cancel_scope.cancel()
    if refused is not None:
        raise refused
    async with stream:
        return [out async for out in stream][-1]


async def test_text_and_chat_are_tokenized_off_the_loop_and_20_mb_is_refused_unread(llama_dir, tok_dir, monkeypatch):
    hf = AutoTokenizer.from_pretrained(tok_dir)
    chat_text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    calls: list[str] = []
    async with AsyncLLM(str(llama_dir), tokenizer=str(tok_dir), dtype="float32", max_model_len=256,
                        kv_cache_memory="32MiB") as llm:
        outputs = []
        for prompt in ("The colour of the sky is", ChatPrompt(MESSAGES)):
            ticker = Ticker()
            monkeypatch.setattr(llm.tokenizer, "encode", encode_after_ticks(hf.encode, ticker, calls))
            outputs.append(await last_output(llm, prompt, ticker))
        with pytest.raises(InvalidRequest, match="is 20000000 characters long") as info:
            await last_output(llm, "a" * 20_000_000, Ticker())
    assert info.value.param == "prompt" and len(calls) == 2  # refused without tokenizing
    assert outputs[0].prompt_token_ids == hf.encode("The colour of the sky is")
    assert outputs[1].prompt_token_ids == hf.encode(chat_text, add_special_tokens=False)
    assert outputs[1].prompt == chat_text
