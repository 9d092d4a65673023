"""What the API routes share: the server state, JSON and SSE framing, and client disconnects.

`ServerState` is what routes need from the app: the gateway (every model group and
its deployments), the metrics, metering and the authenticator; `principal()` is who
is calling. `sse()` frames one event (escaping
the characters splitlines-based readers would cut it at); `cancel_on_disconnect`
abandons the work of a client that went away, which aborts its engine requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from inferd.api.auth import Authenticator
from inferd.api.body_limits import BodyLimits, check_content_type, check_shape, decode, read_limited
from inferd.api.metrics import EngineMetrics
from inferd.batch.runner import BatchRunner
from inferd.engine.tokenizer import Tokenizer
from inferd.gateway.metrics import GatewayMetrics
from inferd.gateway.router import Gateway
from inferd.gateway.versions import VersionManager
from inferd.providers.base import ModelInfo
from inferd.tenancy.intake import Admission, admit
from inferd.tenancy.keys import Principal
from inferd.tenancy.metering import Metering
from inferd.tenancy.response_cache import ResponseCache
from inferd.wire.errors import http_error
from inferd.wire.request import Endpoint, parse_request
from inferd.wire.schema import validation_error

M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerState:
    gateway: Gateway
    engine_metrics: EngineMetrics
    gateway_metrics: GatewayMetrics
    registry: Any
    metering: Metering
    authenticator: Authenticator
    response_cache: ResponseCache
    batch_runner: BatchRunner
    body_limits: BodyLimits = field(default_factory=BodyLimits)
    versions: VersionManager | None = None  # model versions (None: an app built without a store to keep them)
    config_path: str | None = None          # the gateway config a reload reads again
    created: int = field(default_factory=lambda: int(time.time()))

    def tokenizer(self, model: str | None) -> tuple[Tokenizer, ModelInfo]:
        """The tokenizer of the model `model` names, and its facts (for the tokenizer endpoints)."""
        group = self.gateway.resolve(model)
        for h in group.handles:
            if h.deployment.tokenizer is not None:
                return h.deployment.tokenizer, h.deployment.info
        raise http_error(400, f"the model {group.name!r} has no local engine, so no tokenizer here",
                         param="model")


def state(request: Request) -> ServerState:
    return request.app.state.inferd


def principal(request: Request) -> Principal | None:
    """Who is calling (None on an open server); set by the request middleware."""
    return request.state.principal


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None,
                  background: BackgroundTask | None = None) -> Response:
    # msgspec writes non-finite floats as null, so the body is always valid JSON
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json",
                    headers=headers, background=background)


async def read_json(request: Request) -> dict:
    """The request body as a JSON object within the server's `BodyLimits`, or a 4xx saying what is wrong."""
    limits: BodyLimits = state(request).body_limits
    check_content_type(request.headers.get("content-type"))
    raw = await read_limited(request.stream(), limits.max_bytes)
    body = decode(raw, limits.max_depth)
    if not isinstance(body, dict):
        raise http_error(400, "the request body must be a JSON object")
    check_shape(body, limits.max_depth)
    return body


async def admit_body(request: Request, endpoint: Endpoint) -> Admission:
    """Read and parse the body as one `InferenceRequest` (with the request's id and caller), then resolve,
    admit and meter it (tenancy/intake.py); the route is kept on the request for the overhead header."""
    st = state(request)
    typed = parse_request(endpoint, await read_json(request), request_id=request.state.request_id,
                          caller=principal(request))
    admission = await admit(st.gateway, st.metering, typed)
    request.state.route = admission.route
    return admission


async def read_model(request: Request, model: type[M]) -> M:
    """The request body validated as `model`; a 400 naming the first bad field otherwise."""
    body = await read_json(request)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


# Characters that str.splitlines() treats as line breaks although SSE does not
# (U+0085, U+2028, U+2029). Models do emit them, and clients that read the
# stream with splitlines-based readers (httpx's iter_lines among them) would cut
# an event in two; JSON lets us write them escaped instead.
_SPLITLINES_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"),
                      (b"\xe2\x80\xa9", b"\\u2029"))


def sse(obj: Any) -> bytes:
    data = msgspec.json.encode(obj)
    for raw, escaped in _SPLITLINES_BREAKS:
        if raw in data:  # UTF-8 is self-synchronizing: these bytes are only ever that character
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def cancel_on_disconnect(request: Request, work: Awaitable) -> Any:
    """Await `work`, cancelling it if the client disconnects first (its requests abort)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        raise http_error(499, "the client closed the request", type="client_closed_request")
    return task.result()


_background: set[asyncio.Task] = set()


def spawn(coro: Awaitable) -> None:
    """Run `coro` to the end on its own task, whatever happens to the caller's."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)

