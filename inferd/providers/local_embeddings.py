"""`LocalEmbeddingDeployment`: an embedding model in its own process, as a gateway deployment.

It owns an `AsyncEmbedder` (dynamic batching happens in the embedding process)
and speaks OpenAI's embeddings format: `input` as a string, a list of strings,
token ids or lists of token ids; `encoding_format` float or base64 (little-endian
float32, as OpenAI sends it); `dimensions` where the model allows it. An input
over the model's length is a 400 unless the request sets `truncate_prompt_tokens`
(vLLM's name) or `truncate: true`. Errors are classified like the chat engine's.
"""

from __future__ import annotations

import base64
import time

from inferd.engine.embedding.client import AsyncEmbedder
from inferd.engine.embedding.spec import EmbedConfig
from inferd.engine.messages import EmbedStats
from inferd.providers.base import Deployment, ModelInfo
from inferd.providers.local import classified, refusal
from inferd.wire.errors import ErrorKind, InferdError
from inferd.wire.request import InferenceRequest


class LocalEmbeddingDeployment(Deployment):
    endpoints = frozenset({"embeddings"})

    def __init__(self, name: str, model_name: str, config: EmbedConfig):
        self.name, self.model_name = name, model_name
        self.embedder = AsyncEmbedder(config)

    async def start(self) -> None:
        await self.embedder.start()

    @property
    def healthy(self) -> bool:
        return self.embedder.is_healthy

    def unavailable(self) -> InferdError:
        return refusal(self.embedder.check_accepting) or super().unavailable()

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.model_name, max_model_len=self.embedder.max_len,
                         extra={"dimension": self.embedder.dimension})

    def stats(self) -> EmbedStats:
        return self.embedder.stats

    async def request(self, request: InferenceRequest) -> dict:
        if request.endpoint != "embeddings":
            raise InferdError(ErrorKind.INVALID_REQUEST, f"{self.model_name!r} is an embedding model; "
                              "use /v1/embeddings", status=400, param="model")
        req = request.body
        with classified():
            truncate = req.truncate or req.truncate_prompt_tokens is not None
            result = await self.embedder.embed(req.inputs(), truncate=truncate, dimensions=req.dimensions)
        data = []
        for i, vec in enumerate(result.vectors):
            value = (base64.b64encode(vec.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                     else vec.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = result.total_tokens
        return {"object": "list", "data": data, "model": self.model_name, "created": int(time.time()),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def stream(self, request: InferenceRequest):
        raise InferdError(ErrorKind.INVALID_REQUEST, "embeddings are not streamed", status=400, param="stream")
        yield  # pragma: no cover - makes this an async generator

    async def aclose(self) -> None:
        await self.embedder.shutdown()
