"""`InferenceRequest`: one request, parsed once at the edge, read by every layer below it.

The API routes and the batch runner turn a body into an `InferenceRequest` with
`parse_request`: the endpoint, the body validated against its wire model (a bad
field is a 400 naming it, whatever deployment would have served it), the raw
body, the one request id, who is calling, and the batch it belongs to. From then
on estimation, routing keys, the response cache, metering, the local engine and
the provider translations read the typed `body`; the raw body is only passed
through to remote OpenAI-compatible servers (`passthrough`), so fields they know
and inferd does not reach them untouched, and it is what the response cache
hashes (`cache_identity`), since those fields change the answer too.

The request id is the client's `X-Request-Id` (or one made up at the edge; a
batch line's own id) and is everywhere the request is: the response `id`
(`response_id`), the ledger row, the engine's log lines and batch output lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from inferd.engine.sampling_params import InvalidParameterError
from inferd.wire.errors import invalid
from inferd.wire.schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, validation_error

Endpoint = Literal["chat", "completions", "embeddings"]

ENDPOINT_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
                                  "embeddings": "/v1/embeddings"}
_SCHEMAS = {"chat": ChatCompletionRequest, "completions": CompletionRequest, "embeddings": EmbeddingRequest}
_ID_PREFIXES = {"chat": "chatcmpl", "completions": "cmpl", "embeddings": "embd"}
# what does not change an answer: left out of the response cache's identity
_NOT_IDENTITY = ("stream", "stream_options", "user")
# inferd's own fields, not sent to upstream servers
_INFERD_ONLY = ("priority",)


class Caller(Protocol):
    """Who is calling, as far as the layers below tenancy need to know (tenancy's `Principal` is one)."""

    key_id: str
    team: str | None


@dataclass(frozen=True)
class InferenceRequest:
    """`endpoint` is chat, completions or embeddings with their wire bodies; a tensor model's call is
    `infer` (or `infer@<version>`) with its decoded tensors (classic/tensors.py) as the body."""

    endpoint: Endpoint | str
    body: ChatCompletionRequest | CompletionRequest | EmbeddingRequest | Any
    raw: Mapping[str, Any]
    request_id: str
    caller: Caller | None = None
    batch_id: str | None = None
    model: str | None = None    # the model (group) it names
    version: str | None = None  # the model version it is pinned to (a batch's lines), while that version is loaded

    @property
    def stream(self) -> bool:
        return bool(getattr(self.body, "stream", False))

    @property
    def priority(self) -> int:
        return getattr(self.body, "priority", 0)

    @property
    def team(self) -> str | None:
        return self.caller.team if self.caller is not None else None

    @property
    def response_id(self) -> str:
        """The response's `id` (and the stream's chunks'): derived from the request id."""
        return f"{_ID_PREFIXES[self.endpoint]}-{self.request_id}"

    def passthrough(self, model: str) -> dict:
        """The body for an upstream OpenAI-compatible server: as the client sent it, for `model`."""
        return {**{k: v for k, v in self.raw.items() if k not in _INFERD_ONLY}, "model": model}

    def cache_identity(self) -> dict:
        """What makes two requests the same question, for the response cache."""
        return {k: v for k, v in self.raw.items() if k not in _NOT_IDENTITY}

    def with_priority(self, priority: int) -> InferenceRequest:
        """The same request scheduled at `priority` (the batch runner's default for its lines)."""
        body = self.body
        if "priority" in type(body).model_fields:  # embeddings have no scheduling priority
            body = body.model_copy(update={"priority": priority})
        return replace(self, raw={**self.raw, "priority": priority}, body=body)


def parse_request(endpoint: Endpoint, raw: Mapping[str, Any], *, request_id: str, caller: Caller | None = None,
                  batch_id: str | None = None) -> InferenceRequest:
    """Validate `raw` against the endpoint's wire model; an `InferdError` 400 naming the field otherwise."""
    try:
        body = _SCHEMAS[endpoint].model_validate(raw)
    except ValidationError as e:
        raise validation_error(e) from None
    if endpoint != "embeddings":
        try:  # what pydantic cannot see field by field: one output constraint at most, token-id keys
            body.output_constraint()
            body.token_bias()
            if endpoint == "chat":
                body.check_tools()
                body.check_continuation()
        except InvalidParameterError as e:
            raise invalid(str(e), e.param) from None
    return InferenceRequest(endpoint, body, raw, request_id, caller, batch_id, body.model)
