"""asyncpp's HTTP layer: an OpenAI-compatible Starlette app around one AsyncLLM."""
from asyncpp.server.app import build_app

__all__ = ["build_app"]
