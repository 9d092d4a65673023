"""inferd: a self-hosted AI inference server with its own engine."""

from inferd.engine.config import EngineConfig
from inferd.engine.offline.llm import LLM
from inferd.engine.outputs import CompletionOutput, RequestOutput
from inferd.engine.sampling_params import InvalidParameterError, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput",
           "InvalidParameterError", "__version__"]
