"""`asyncpp serve`: the OpenAI-compatible HTTP server on uvicorn.

The main CLI (asyncpp/cli.py) adds it with `add_serve_parser(subparsers)`; `python -m
asyncpp.server` parses `add_serve_args` itself. Both run it with `run_serve(namespace)`."""
from __future__ import annotations

import argparse
import os

import uvicorn

from asyncpp.config import EngineArgs
from asyncpp.server.app import build_app

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument("--api-key", default=os.environ.get("ASYNCPP_API_KEY"),
                       help="require `Authorization: Bearer <key>` (default: $ASYNCPP_API_KEY, else none)")
    group.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn log level")
    group.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                       help="log one line per HTTP request")


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                                   description="Serve a model over an OpenAI-compatible HTTP API "
                                               "(POST /v1/completions, /v1/chat/completions, ...).")
    add_serve_args(parser)
    parser.set_defaults(func=run_serve)
    return parser


def run_serve(ns: argparse.Namespace) -> None:
    """Serves until Ctrl-C or SIGTERM; uvicorn's lifespan then closes the engine and its processes."""
    app = build_app(EngineArgs.from_cli_args(ns), api_key=ns.api_key)
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level, access_log=ns.access_log,
                timeout_graceful_shutdown=5)
