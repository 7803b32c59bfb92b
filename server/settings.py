"""What the operator sets for the HTTP layer (beside EngineArgs): auth, hosts, limits, logging."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from asyncpp.prompts import PROMPT_CHARS_PER_TOKEN
from asyncpp.server.tool_parsers import TOOL_PARSERS

MIB = 2**20
BASE_BODY_BYTES = 4 * MIB
# The engine takes at most PROMPT_CHARS_PER_TOKEN characters of prompt text per token of
# max_model_len; JSON may spend 6 bytes on one character (\uXXXX).
BODY_BYTES_PER_TOKEN = PROMPT_CHARS_PER_TOKEN * 6


@dataclass(slots=True)
class ServerSettings:
    api_key: str | None = None
    allowed_hosts: list[str] | None = None  # Host header names; None or "*": any
    trust_request_chat_template: bool = False
    max_request_body_bytes: int | None = None  # None: default_body_limit(max_model_len)
    timeout_request_body_s: float = 60.0
    chat_template_timeout_s: float = 5.0
    log_stats_interval_s: float = 10.0  # 0: off
    enable_dev_endpoints: bool = False  # POST /reset_prefix_cache (vLLM: VLLM_SERVER_DEV_MODE=1)
    metrics_require_key: bool = False  # GET /metrics behind the API key too
    enable_auto_tool_choice: bool = False  # tool_choice "auto": the parser reads calls out of free text
    tool_call_parser: str | None = None  # a name of TOOL_PARSERS (hermes, llama3_json)

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (which format to read calls in)")
        if self.max_request_body_bytes is not None and self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be positive, got {self.max_request_body_bytes}")
        for name in ("timeout_request_body_s", "chat_template_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.log_stats_interval_s < 0:
            raise ValueError(f"log_stats_interval_s must be >= 0, got {self.log_stats_interval_s}")

    def body_limit(self, max_model_len: int) -> int:
        return self.max_request_body_bytes or default_body_limit(max_model_len)


def default_body_limit(max_model_len: int) -> int:
    """A few MiB for the request around the prompt, plus room for the longest prompt text."""
    return BASE_BODY_BYTES + BODY_BYTES_PER_TOKEN * max_model_len


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def default_allowed_hosts(bind_host: str) -> list[str] | None:
    """Host names a client may put in `Host` when the operator names none: on loopback the
    bound address and localhost's names (a browser page elsewhere then cannot reach the
    server through DNS rebinding); on a wildcard address any; else the bound address."""
    if bind_host in ("", "0.0.0.0", "::", "*"):
        return None
    if bind_host == "localhost" or _is_loopback(bind_host):
        return sorted({bind_host, *LOOPBACK_NAMES})
    return [bind_host]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
