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
  a cut stream, a malformed chunk or a missing `[DONE]` raises `ProviderError`.
  Streams always end with a chunk carrying `usage` (with `choices: []`), whatever
  the client asked, so the gateway can meter; the API layer drops it when the
  client did not ask for usage.
- Every failure is a `ProviderError` whose `kind` says what the gateway may do about
  it (retry, fall back, or hand it to the client as is).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

Endpoint = Literal["chat", "completions", "embeddings"]

ENDPOINT_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
                                  "embeddings": "/v1/embeddings"}


class ErrorKind(enum.Enum):
    RATE_LIMIT = "rate_limit"          # 429: retry later (Retry-After) or fall back
    OVERLOADED = "overloaded"          # 503 with a retry hint: the deployment is busy, not broken
    SERVER = "server"                  # 5xx: retry, then fall back
    CONNECTION = "connection"          # refused, reset, DNS: retry, then fall back
    TIMEOUT = "timeout"                # connect / first token / total / stream silence
    CONTEXT_LENGTH = "context_length"  # the prompt does not fit: fall back to a larger model, never retry
    CONTENT_POLICY = "content_policy"  # refused by the provider's policy: propagate, never retry
    INVALID_REQUEST = "invalid_request"  # the client's fault (400/404/422): propagate
    AUTH = "auth"                      # 401/403 from upstream: a configuration problem, fall back

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE


_RETRYABLE = {ErrorKind.RATE_LIMIT, ErrorKind.OVERLOADED, ErrorKind.SERVER, ErrorKind.CONNECTION,
              ErrorKind.TIMEOUT}


class ProviderError(Exception):
    """A failed call to a deployment, classified.

    `status` and `body` are what the client sees if this error is the final answer
    (an OpenAI error body); `retry_after` is the upstream's hint in seconds, if any.
    """

    def __init__(self, kind: ErrorKind, message: str, *, status: int = 502,
                 code: str | None = None, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status
        self.code, self.param, self.retry_after = code, param, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.kind, "server_error"),
                          "param": self.param, "code": self.code}}


_ERROR_TYPES = {ErrorKind.RATE_LIMIT: "rate_limit_error", ErrorKind.INVALID_REQUEST: "invalid_request_error",
                ErrorKind.CONTEXT_LENGTH: "invalid_request_error",
                ErrorKind.CONTENT_POLICY: "invalid_request_error",
                ErrorKind.OVERLOADED: "service_unavailable_error", ErrorKind.AUTH: "authentication_error",
                ErrorKind.TIMEOUT: "timeout_error"}


def classify_status(status: int, message: str, code: str | None = None, *, param: str | None = None,
                    retry_after: float | None = None) -> ProviderError:
    """A `ProviderError` for an HTTP error status and the error body's message/code."""
    text = f"{code or ''} {message}".lower()
    if code == "context_length_exceeded" or "context length" in text or "context window" in text \
            or "too many tokens" in text or "prompt is too long" in text:
        kind = ErrorKind.CONTEXT_LENGTH
    elif code == "content_policy_violation" or "content policy" in text or "content_filter" in text:
        kind = ErrorKind.CONTENT_POLICY
    elif status == 429:
        kind = ErrorKind.RATE_LIMIT
    elif status in (401, 403):
        kind = ErrorKind.AUTH
    elif status == 503 and retry_after is not None:
        kind = ErrorKind.OVERLOADED
    elif status >= 500 or status in (408, 409):
        kind = ErrorKind.SERVER
    else:
        kind = ErrorKind.INVALID_REQUEST
    return ProviderError(kind, message, status=status, code=code, param=param, retry_after=retry_after)


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
        """The full response body for a non-streamed request; raises `ProviderError`."""

    @abstractmethod
    def stream(self, endpoint: Endpoint, body: dict) -> AsyncIterator[dict]:
        """Chunk bodies of a streamed request, ending with a usage chunk; raises `ProviderError`."""

    async def start(self) -> None:
        """Start what the deployment runs itself (a local engine's process); remote ones have nothing to start."""

    @property
    def healthy(self) -> bool:
        """False while the deployment cannot take work at all (a dead or draining engine)."""
        return True

    def unavailable(self) -> ProviderError:
        """The error for a request that finds the deployment not `healthy`."""
        return ProviderError(ErrorKind.SERVER, f"{self.name} is not accepting requests", status=503)

    async def aclose(self) -> None:
        """Release connections / processes."""
