"""asyncpp: async-first pipeline-parallel LLM inference.

The names below load on first use, so that `from asyncpp import Client` (httpx only) does
not import torch and transformers."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "AsyncLLM": "asyncpp.async_llm",
    "ChatPrompt": "asyncpp.prompts",
    "Client": "asyncpp.client",
    "CompletionOutput": "asyncpp.core.outputs",
    "EngineArgs": "asyncpp.engine_args",
    "EngineDeadError": "asyncpp.core.errors",
    "LLM": "asyncpp.llm",
    "QueueFullError": "asyncpp.core.errors",
    "RequestOutput": "asyncpp.core.outputs",
    "SamplingParams": "asyncpp.core.sampling_params",
    "StageDiedError": "asyncpp.core.errors",
    "StructuredOutputsParams": "asyncpp.core.structured_outputs",
}
__all__ = ["AsyncLLM", "ChatPrompt", "Client", "CompletionOutput", "EngineArgs", "EngineDeadError", "LLM",
           "QueueFullError", "RequestOutput", "SamplingParams", "StageDiedError", "StructuredOutputsParams",
           "__version__"]

if TYPE_CHECKING:
    from asyncpp.async_llm import AsyncLLM
    from asyncpp.client import Client
    from asyncpp.core.errors import EngineDeadError, QueueFullError, StageDiedError
    from asyncpp.core.outputs import CompletionOutput, RequestOutput
    from asyncpp.core.sampling_params import SamplingParams
    from asyncpp.core.structured_outputs import StructuredOutputsParams
    from asyncpp.engine_args import EngineArgs
    from asyncpp.llm import LLM
    from asyncpp.prompts import ChatPrompt


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'asyncpp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
