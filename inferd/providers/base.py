"""What every deployment offers the gateway: one request in the OpenAI wire format, out as a
response body or a stream of chunk bodies, and failures as one classified error type.

A `Deployment` is one place a public model can be served from: a local engine core
(`providers/local.py`), an OpenAI-compatible server or the Anthropic Messages API
(`providers/openai_compat.py`, `providers/anthropic.py`). The gateway (`gateway/`)
owns retries, fallback and timeouts policy; deployments never retry on their own.

The contract:
- `request(request)` takes the typed `InferenceRequest` (wire/request.py) and returns
  the OpenAI response body (a dict) for a non-streamed call: `chat.completion`,
  `text_completion` or an embeddings `list`, its `id` the request's `response_id`.
- `stream(request)` is an async iterator of OpenAI chunk bodies (dicts,
  without the final `[DONE]`). It ends normally only when the answer really ended;
  a cut stream, a malformed chunk or a missing `[DONE]` raises `InferdError`.
  Streams always end with a chunk carrying `usage` (with `choices: []`), whatever
  the client asked, so the gateway can meter; the API layer drops it when the
  client did not ask for usage.
- Every failure is an `InferdError` (wire/errors.py) whose `kind` says what the gateway
  may do about it (retry, fall back, or hand it to the client as is).
- What the server shows of a deployment (its model's facts, a tokenizer, engine
  counters for /metrics, draining at shutdown) is asked through the same interface;
  remote deployments keep the defaults (nothing to show, nothing to drain).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from inferd.engine.client.async_client import RequestMetrics
from inferd.engine.tokenizer import Tokenizer
from inferd.wire.errors import ErrorKind, InferdError
from inferd.wire.request import InferenceRequest


_CHUNK_IDENTITY = ("id", "object", "created", "model")


def usage_unknown_chunk(like: dict) -> dict:
    """The closing chunk of a stream whose usage never came: no choices, `usage: null`, with the identity
    (id, object, created, model) of `like`, a chunk of the same stream."""
    return {**{key: like[key] for key in _CHUNK_IDENTITY if key in like}, "choices": [], "usage": None}


@dataclass(frozen=True)
class Timeouts:
    """Seconds; None means no limit. Remote deployments enforce them and raise `TIMEOUT` errors."""

    connect: float | None = 10.0
    # request sent -> first streamed chunk (streams only). Chat providers send a first token within a
    # few seconds for ordinary prompts; one that has not in 10 s is overloaded or stuck, and another
    # deployment answers sooner than waiting longer would. Raise it for reasoning models that stream
    # nothing while they think, and for very long prompts.
    first_token: float | None = 10.0
    total: float | None = 600.0          # the whole call
    # longest gap between two streamed chunks: tokens come tens of milliseconds apart, so 10 s of
    # silence mid-answer is a stall (keep-alive comments do not count as chunks)
    stream_silence: float | None = 10.0


@dataclass(frozen=True)
class ModelInfo:
    """What /v1/models says about a model a deployment runs itself."""

    id: str
    source: str | None = None          # the checkpoint it was loaded from
    max_model_len: int | None = None
    vocab_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Deployment(ABC):
    """One place a model is served from. Subclasses implement the two calls and `aclose`."""

    #: unique name of this deployment in the gateway config (metrics, headers, the ledger)
    name: str
    #: the endpoints this deployment serves
    endpoints: frozenset[str] = frozenset({"chat", "completions"})
    #: whether a chat request may end with a partial assistant message for it to continue (an assistant
    #: prefill: vLLM's `continue_final_message`); the gateway finishes broken streams this way
    takes_prefill: bool = False

    @abstractmethod
    async def request(self, request: InferenceRequest) -> dict:
        """The full response body for a non-streamed request; raises `InferdError`."""

    @abstractmethod
    def stream(self, request: InferenceRequest) -> AsyncIterator[dict]:
        """Chunk bodies of a streamed request, ending with a usage chunk; raises `InferdError`."""

    async def start(self) -> None:
        """Start what the deployment runs itself (a local engine's process); remote ones have nothing to start."""

    @property
    def healthy(self) -> bool:
        """False while the deployment cannot take work at all (a dead or draining engine)."""
        return True

    @property
    def recovering(self) -> bool:
        """True while the deployment is down but being brought back by itself (a replica whose engine
        died and is restarting): the server stays healthy meanwhile, its group's other replicas answer."""
        return False

    def placement(self) -> dict | None:
        """Where a deployment that runs its own engine elsewhere runs it (node, process, restarts)."""
        return None

    def unavailable(self) -> InferdError:
        """The error for a request that finds the deployment not `healthy`."""
        return InferdError(ErrorKind.SERVER, f"{self.name} is not accepting requests", status=503)

    @property
    def info(self) -> ModelInfo | None:
        """The facts of a model this deployment runs itself (None: a remote one's are not known here)."""
        return None

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer, for /tokenize and /detokenize (None: not available here)."""
        return None

    def stats(self) -> Any:
        """The engine's latest counters for /metrics (a `Stats` or `EmbedStats` message; None: none)."""
        return None

    def observe_requests(self, on_done: Callable[[RequestMetrics], None]) -> None:
        """Have `on_done` called with each finished request's timings (engines that time them do)."""

    async def drain(self, timeout: float) -> None:
        """At shutdown: refuse new work, give what is in flight `timeout` seconds."""

    async def aclose(self) -> None:
        """Release connections / processes."""
