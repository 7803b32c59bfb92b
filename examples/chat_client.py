"""A streaming chat client on asyncpp.Client.

Start a server first (`asyncpp serve`, default model SmolLM2-135M-Instruct), then:

    python examples/chat_client.py                          # interactive; empty line quits
    python examples/chat_client.py --message "What is the capital of France?"
"""
from __future__ import annotations

import argparse

import anyio

from asyncpp import Client


async def reply(client: Client, history: list[dict], max_tokens: int, temperature: float) -> str:
    """Prints the assistant's answer as it streams in; returns it whole."""
    parts = []
    async for delta in client.chat_stream(history, max_tokens=max_tokens, temperature=temperature):
        print(delta, end="", flush=True)
        parts.append(delta)
    print()
    return "".join(parts)


async def main(ns: argparse.Namespace) -> None:
    async with Client(ns.base_url, api_key=ns.api_key) as client:
        history = [{"role": "system", "content": ns.system}] if ns.system else []

        async def turn(text: str) -> None:
            history.append({"role": "user", "content": text})
            print("assistant> ", end="", flush=True)
            answer = await reply(client, history, ns.max_tokens, ns.temperature)
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
    anyio.run(main, parser.parse_args())
