"""asyncpp: async-first pipeline-parallel LLM inference."""
from asyncpp.async_llm import AsyncLLM
from asyncpp.config import EngineArgs
from asyncpp.llm import LLM
from asyncpp.core.outputs import CompletionOutput, RequestOutput
from asyncpp.core.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["AsyncLLM", "Client", "CompletionOutput", "EngineArgs", "LLM", "RequestOutput",
           "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "Client":  # httpx is only needed by SDK users
        from asyncpp.client import Client
        return Client
    raise AttributeError(name)
