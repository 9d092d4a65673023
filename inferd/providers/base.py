"""What every deployment offers the gateway: one request in the OpenAI wire format, out as a
response body or a stream of chunk bodies, and failures as one classified error type.

A `Deployment` is one place a public model can be served from: a local engine core
(`providers/local.py`), an OpenAI-compatible server or the Anthropic Messages API
(`providers/openai_compat.py`, `providers/anthropic.py`). The gateway (`gateway/`)
owns retries, fallback and timeouts policy; deployments never retry on their own.

The contract:
- `request(endpoint, body)` returns the OpenAI response body (a dict) for a
  non-streamed call: `chat.completion`, `text_completion` or an embeddings `list`.
- `stream(endpoint, body)` is an async iterator of OpenAI chunk bodies (dicts,
  without the final `[DONE]`). It ends normally only when the answer really ended;
  a cut stream, a malformed chunk or a missing `[DONE]` raises `InferdError`.
  Streams always end with a chunk carrying `usage` (with `choices: []`), whatever
  the client asked, so the gateway can meter; the API layer drops it when the
  client did not ask for usage.
- Every failure is an `InferdError` (wire/errors.py) whose `kind` says what the gateway
  may do about it (retry, fall back, or hand it to the client as is).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from inferd.wire.errors import ErrorKind, InferdError

Endpoint = Literal["chat", "completions", "embeddings"]

ENDPOINT_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
                                  "embeddings": "/v1/embeddings"}


@dataclass(frozen=True)
class Timeouts:
    """Seconds; None means no limit. Remote deployments enforce them and raise `TIMEOUT` errors."""

    connect: float | None = 10.0
    first_token: float | None = 60.0     # request sent -> first streamed chunk (streams only)
    total: float | None = 600.0          # the whole call
    stream_silence: float | None = 30.0  # longest gap between two streamed chunks


@dataclass(frozen=True)
class ModelInfo:
    """What /v1/models says about a deployment's model."""

    id: str
    owned_by: str = "inferd"
    max_model_len: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Deployment(ABC):
    """One place a model is served from. Subclasses implement the two calls and `aclose`."""

    #: unique name of this deployment in the gateway config (metrics, headers, the ledger)
    name: str
    #: the endpoints this deployment serves
    endpoints: frozenset[str] = frozenset({"chat", "completions"})

    @abstractmethod
    async def request(self, endpoint: Endpoint, body: dict) -> dict:
        """The full response body for a non-streamed request; raises `InferdError`."""

    @abstractmethod
    def stream(self, endpoint: Endpoint, body: dict) -> AsyncIterator[dict]:
        """Chunk bodies of a streamed request, ending with a usage chunk; raises `InferdError`."""

    async def start(self) -> None:
        """Start what the deployment runs itself (a local engine's process); remote ones have nothing to start."""

    @property
    def healthy(self) -> bool:
        """False while the deployment cannot take work at all (a dead or draining engine)."""
        return True

    def unavailable(self) -> InferdError:
        """The error for a request that finds the deployment not `healthy`."""
        return InferdError(ErrorKind.SERVER, f"{self.name} is not accepting requests", status=503)

    async def aclose(self) -> None:
        """Release connections / processes."""
