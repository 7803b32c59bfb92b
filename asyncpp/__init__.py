"""asyncpp: async-first pipeline-parallel LLM inference."""
from asyncpp.async_llm import AsyncLLM
from asyncpp.client import Client
from asyncpp.config import EngineArgs
from asyncpp.core.errors import EngineDeadError, QueueFullError, StageDiedError
from asyncpp.core.outputs import CompletionOutput, RequestOutput
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.llm import LLM

__version__ = "0.1.0"
__all__ = ["AsyncLLM", "Client", "CompletionOutput", "EngineArgs", "EngineDeadError", "LLM", "QueueFullError",
           "RequestOutput", "SamplingParams", "StageDiedError", "__version__"]
