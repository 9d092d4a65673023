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
from typing import Literal

from pydantic import Field

from inferd.engine.embedding.client import AsyncEmbedder
from inferd.engine.embedding.spec import EmbedConfig
from inferd.providers.base import Deployment, Endpoint, ModelInfo
from inferd.providers.local import classified, refusal
from inferd.wire.errors import ErrorKind, InferdError
from inferd.wire.schema import WireModel

_I32 = 2**31 - 1


class EmbeddingRequest(WireModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=_I32)
    user: str | None = None
    truncate: bool = False
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=_I32)

    def inputs(self) -> list[str] | list[list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if not self.input:
            raise InferdError(ErrorKind.INVALID_REQUEST, "input: must not be empty", status=400, param="input")
        if isinstance(self.input[0], int):
            return [self.input]
        if any(isinstance(x, str) for x in self.input) and any(not isinstance(x, str) for x in self.input):
            raise InferdError(ErrorKind.INVALID_REQUEST, "input: mix of strings and token ids", status=400,
                                param="input")
        return list(self.input)


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

    async def request(self, endpoint: Endpoint, body: dict) -> dict:
        if endpoint != "embeddings":
            raise InferdError(ErrorKind.INVALID_REQUEST, f"{self.model_name!r} is an embedding model; "
                                "use /v1/embeddings", status=400, param="model")
        with classified():
            req = EmbeddingRequest.model_validate(body)
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

    async def stream(self, endpoint: Endpoint, body: dict):
        raise InferdError(ErrorKind.INVALID_REQUEST, "embeddings are not streamed", status=400, param="stream")
        yield  # pragma: no cover - makes this an async generator

    async def aclose(self) -> None:
        await self.embedder.shutdown()
