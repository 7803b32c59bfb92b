"""`asyncpp` command line: serve, generate, bench."""
from __future__ import annotations

import argparse
import logging
import sys

import anyio

from asyncpp.async_llm import AsyncLLM
from asyncpp.bench.cli import add_bench_parser
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine_args import EngineArgs
from asyncpp.server.cli import add_serve_parser


def _add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="one-shot completion, printed as it streams")
    EngineArgs.add_cli_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the tokenizer's chat template when it has one")
    p.set_defaults(func=_run_generate)


def _run_generate(ns: argparse.Namespace) -> int:
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature,
                            top_p=ns.top_p, top_k=ns.top_k)

    async def run() -> None:
        async with AsyncLLM(engine_args=EngineArgs.from_cli_args(ns)) as engine:
            prompt = _chat_prompt(engine.tokenizer, ns.prompt) if ns.chat else ns.prompt
            printed = 0
            async for out in engine.generate(prompt, params):
                text = out.outputs[0].text
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)
            print()

    anyio.run(run)
    return 0


def _chat_prompt(tokenizer, text: str) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncpp", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subparsers)
    _add_generate_parser(subparsers)
    add_bench_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(ns, "log_level", "INFO").upper() if isinstance(
        getattr(ns, "log_level", None), str) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(ns.func(ns) or 0)
    except ValueError as e:  # errors a user can cause: say what is wrong, no traceback
        print(f"asyncpp: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
