"""The same streaming chat client with the official `openai` package, unchanged, pointed
at asyncpp's OpenAI-compatible server.

    asyncpp serve &
    python examples/openai_chat_client.py --message "What is the capital of France?"
"""
from __future__ import annotations

import argparse
import asyncio

from openai import AsyncOpenAI


async def reply(client: AsyncOpenAI, model: str, history: list[dict], max_tokens: int, temperature: float) -> str:
    parts = []
    stream = await client.chat.completions.create(model=model, messages=history, stream=True,
                                                  max_tokens=max_tokens, temperature=temperature)
    async for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            print(delta, end="", flush=True)
            parts.append(delta)
    print()
    return "".join(parts)


async def main(ns: argparse.Namespace) -> None:
    # The server needs no key unless started with --api-key; the openai package insists on one.
    client = AsyncOpenAI(base_url=ns.base_url.rstrip("/") + "/v1", api_key=ns.api_key or "unused")
    async with client:
        model = (await client.models.list()).data[0].id
        history = [{"role": "system", "content": ns.system}] if ns.system else []

        async def turn(text: str) -> None:
            history.append({"role": "user", "content": text})
            print("assistant> ", end="", flush=True)
            answer = await reply(client, model, history, ns.max_tokens, ns.temperature)
            history.append({"role": "assistant", "content": answer})

        if ns.message:
            await turn(ns.message)
            return
        while text := input("you> ").strip():
            await turn(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--message", default=None, help="send one message and exit")
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    asyncio.run(main(parser.parse_args()))
