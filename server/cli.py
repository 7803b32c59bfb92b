"""`asyncpp serve`: the OpenAI-compatible HTTP server on uvicorn.

The main CLI (asyncpp/cli.py) adds it with `add_serve_parser(subparsers)`; `python -m
asyncpp.server` parses `add_serve_args` itself. Both run it with `run_serve(namespace)`."""
from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from typing import Any

import uvicorn

from asyncpp.async_llm import AsyncLLM
from asyncpp.engine_args import EngineArgs, parse_bytes
from asyncpp.server.app import build_app
from asyncpp.server.connections import GuardedH11Protocol
from asyncpp.server.log_hygiene import log_config
from asyncpp.server.settings import ServerSettings, default_allowed_hosts
from asyncpp.server.shutdown import GracefulServer
from asyncpp.server.tool_parsers import TOOL_PARSERS

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
WANTED_OPEN_FILES = 65536
logger = logging.getLogger("asyncpp.server")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument("--api-key", default=os.environ.get("ASYNCPP_API_KEY"),
                       help="require `Authorization: Bearer <key>` (default: $ASYNCPP_API_KEY, else none)")
    group.add_argument("--allowed-hosts", nargs="+", metavar="HOST",
                       help="names the Host header may carry, or '*' for any (default: on loopback the bound "
                            "address, localhost, 127.0.0.1 and ::1; on 0.0.0.0 or :: any; else the bound address)")
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="render chat templates that requests bring (chat_template); off: refused with 400")
    group.add_argument("--enable-dev-endpoints", action="store_true", default=_env_flag("VLLM_SERVER_DEV_MODE"),
                       help="serve POST /reset_prefix_cache, which lets any client slow every other one down "
                            "(default: off, 404; also on with VLLM_SERVER_DEV_MODE=1, as vLLM)")
    group.add_argument("--metrics-require-key", action="store_true",
                       help="with --api-key, GET /metrics needs the key too (it shows every client's volume); "
                            "default: open, as vLLM, for scrapers without credentials")
    group.add_argument("--max-request-body-bytes", type=_size, metavar="SIZE",
                       help="largest request body, e.g. 8MiB; larger ones get 413 (default: 4 MiB plus 192 bytes "
                            "per token of max_model_len)")
    group.add_argument("--limit-concurrency", type=_number(int), default=1024,
                       help="most connections and requests at once; beyond it requests get 503, and a new "
                            "connection closes the longest-idle one (default 1024)")
    group.add_argument("--timeout-keep-alive", type=_number(float), default=5,
                       help="seconds an idle keep-alive connection stays open after a response (default 5)")
    group.add_argument("--timeout-request-headers", type=_number(float), default=10,
                       help="seconds a client may take to send a request's headers, from its first byte or "
                            "from connecting; then the connection is closed (default 10)")
    group.add_argument("--timeout-request-body", type=_number(float), default=60,
                       help="seconds a client may take to send a request's body; then 408 (default 60)")
    group.add_argument("--log-stats-interval", type=_number(float, minimum=0), default=10,
                       help="seconds between engine stats lines in the log; 0: none (default 10)")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='let requests use tool_choice "auto" (the default when tools are given): calls are read '
                            "out of the model's text with --tool-call-parser")
    group.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS),
                       help="the model's tool-call syntax: hermes (<tool_call>{...}</tool_call>: Hermes, Qwen, "
                            'SmolLM2) | llama3_json ({"name": ..., "parameters": ...}); also the syntax '
                            'tool_choice "required" and named choices are constrained to (default hermes)')
    group.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level")
    group.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                       help="log one line per HTTP request")


def _env_flag(name: str) -> bool:
    """vLLM's reading of a flag variable: an integer, true when not 0."""
    try:
        return bool(int(os.environ.get(name, "0")))
    except ValueError:
        return False


def _number(kind: type, minimum: float | None = None) -> Any:
    """An argparse type: a `kind` above 0, or at least `minimum`."""
    def parse(text: str) -> Any:
        value = kind(text)
        if (value < minimum) if minimum is not None else (value <= 0):
            raise argparse.ArgumentTypeError(f"must be {'>= %g' % minimum if minimum is not None else '> 0'}, "
                                             f"got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its error for text that is no number
    return parse


def _size(text: str) -> int:
    try:
        value = parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a size such as 8MiB or 4000000, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                                   description="Serve a model over an OpenAI-compatible HTTP API "
                                               "(POST /v1/completions, /v1/chat/completions, ...).")
    add_serve_args(parser)
    parser.set_defaults(func=run_serve)
    return parser


def settings_from(ns: argparse.Namespace) -> ServerSettings:
    hosts = ns.allowed_hosts if ns.allowed_hosts is not None else default_allowed_hosts(ns.host)
    return ServerSettings(
        api_key=ns.api_key, allowed_hosts=None if hosts is None or "*" in hosts else hosts,
        trust_request_chat_template=ns.trust_request_chat_template,
        max_request_body_bytes=ns.max_request_body_bytes, timeout_request_body_s=ns.timeout_request_body,
        log_stats_interval_s=ns.log_stats_interval, enable_dev_endpoints=ns.enable_dev_endpoints,
        metrics_require_key=ns.metrics_require_key, enable_auto_tool_choice=ns.enable_auto_tool_choice,
        tool_call_parser=ns.tool_call_parser)


def uvicorn_options(ns: argparse.Namespace) -> dict[str, Any]:
    return dict(http=GuardedH11Protocol.with_header_timeout(ns.timeout_request_headers),
                limit_concurrency=ns.limit_concurrency, timeout_keep_alive=ns.timeout_keep_alive,
                log_config=log_config(ns.log_level), log_level=ns.log_level, access_log=ns.access_log,
                timeout_graceful_shutdown=5)


def run_serve(ns: argparse.Namespace) -> None:
    """Serves until Ctrl-C or SIGTERM; uvicorn's lifespan then closes the engine and its processes.
    A model or layout the engine cannot run raises ValueError before the server starts."""
    app = build_app(AsyncLLM.from_engine_args(EngineArgs.from_cli_args(ns)), settings=settings_from(ns))
    options = uvicorn_options(ns)
    open_files = raise_open_files_limit()
    if ns.limit_concurrency > open_files // 2:
        logger.warning("--limit-concurrency %d is close to the open-file limit (%d): connections may fail",
                       ns.limit_concurrency, open_files)
    server = GracefulServer(uvicorn.Config(app, host=ns.host, port=ns.port, **options))
    try:
        server.run()
    except KeyboardInterrupt:  # a second Ctrl-C
        pass
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the app did not start


def main(argv: list[str] | None = None) -> None:
    """`python -m asyncpp.server`: a model or flag the engine refuses ends with one line, no traceback."""
    parser = argparse.ArgumentParser(prog="python -m asyncpp.server", description="asyncpp's OpenAI-compatible server")
    add_serve_args(parser)
    try:
        run_serve(parser.parse_args(argv))
    except ValueError as e:  # as `asyncpp serve` (asyncpp/cli.py)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def raise_open_files_limit() -> int:
    """Raises the soft limit on open files towards the hard one (as vLLM does); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else min(WANTED_OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft
