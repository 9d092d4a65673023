"""The router: one request in, an answer from the best deployment that can give one, or a clear error.

For a request naming a public model (or an alias) the `Gateway`:
1. admits it (`admission.py`): a group with a TTFT SLO whose local engines are
   predicted to miss it sends the request to its `degrade_to` group, or refuses
   it with 503 + a `Retry-After` computed from how fast the queue drains;
2. orders the group's deployments with the group's routing strategy and tries
   them in turn, skipping those whose circuit breaker is open or that are not
   accepting work; retryable failures (rate limit, overload, 5xx, connection,
   timeout) are retried on the same deployment with backoff that honours
   `Retry-After`, then the next deployment is tried;
3. when a whole group fails, follows the group's fallback chain for that error
   class (`context_length` errors go straight there: the same model would refuse
   again); content-policy and invalid-request errors go back to the client as is.

The router is the only retry loop: deployments never retry. A stream counts as
answered once its first chunk arrived; until then failures are retried or fall
back invisibly, after it a failure ends the stream with an error event (the API
layer writes it) and is never passed off as a finished answer.

Every request carries a `Route`: the record of what was decided (deployment,
attempts, fallback, degradation, time spent upstream), which becomes response
headers, log lines, metrics and, later, the ledger row.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from inferd.gateway.admission import admit
from inferd.gateway.backoff import RetryPolicy, retry_delay
from inferd.gateway.circuit_breaker import CircuitBreaker
from inferd.gateway.metrics import GatewayMetrics
from inferd.gateway.stats import DeploymentStats, Outcome
from inferd.gateway.strategies import RoutingStrategy, routing_key_for
from inferd.providers.base import Deployment
from inferd.wire.errors import ErrorKind, InferdError
from inferd.wire.request import InferenceRequest

log = logging.getLogger(__name__)

# failures that say the deployment itself is broken (they count towards its breaker)
_BREAKER_FAILURES = {ErrorKind.SERVER, ErrorKind.CONNECTION, ErrorKind.TIMEOUT, ErrorKind.AUTH}
# failures of the request itself: the same request would fail anywhere
_CLIENT_FAULTS = {ErrorKind.INVALID_REQUEST, ErrorKind.CONTENT_POLICY}
_FALLBACK_CLASS = {ErrorKind.RATE_LIMIT: "rate_limit", ErrorKind.OVERLOADED: "rate_limit",
                   ErrorKind.SERVER: "server", ErrorKind.CONNECTION: "server", ErrorKind.AUTH: "server",
                   ErrorKind.TIMEOUT: "timeout", ErrorKind.CONTEXT_LENGTH: "context_length"}


@dataclass
class Route:
    """What the gateway decided for one request, and what it cost in time."""

    requested_model: str | None
    endpoint: str
    group: str | None = None              # the group that answered
    deployment: str | None = None         # the deployment that answered
    attempts: int = 0
    fallback_from: str | None = None      # the group first asked, when a fallback answered
    degraded_from: str | None = None      # the group whose SLO sent the request elsewhere
    upstream_s: float = 0.0               # time inside deployment calls (all attempts)
    backoff_s: float = 0.0                # time sleeping between attempts
    errors: list[str] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        h = {"x-inferd-attempts": str(self.attempts)}
        if self.deployment:
            h["x-inferd-deployment"] = self.deployment
        if self.group:
            h["x-inferd-model-group"] = self.group
        if self.fallback_from:
            h["x-inferd-fallback-from"] = self.fallback_from
        if self.degraded_from:
            h["x-inferd-degraded-from"] = self.degraded_from
        return h


@dataclass
class Handle:
    """A deployment inside a group, with the live state routing decisions read."""

    deployment: Deployment
    weight: float = 1.0
    cost_per_mtok: float | None = None
    stats: DeploymentStats = field(default_factory=DeploymentStats)  # a LoadPredictor inside for local engines
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    @property
    def name(self) -> str:
        return self.deployment.name


@dataclass
class ModelGroup:
    name: str
    handles: list[Handle]
    strategy: RoutingStrategy
    aliases: list[str] = field(default_factory=list)
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    degrade_to: str | None = None
    slo_ttft_s: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def serves(self, endpoint: str) -> list[Handle]:
        return [h for h in self.handles if endpoint in h.deployment.endpoints]


Call = Callable[[Handle, InferenceRequest, int], Awaitable[Any]]


class Gateway:
    def __init__(self, groups: list[ModelGroup], *, metrics: GatewayMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, max_total_s: float = 600.0):
        self.groups = groups
        self._by_name = {n: g for g in groups for n in (g.name, *g.aliases)}
        self.metrics = metrics
        self.clock, self.rng, self.sleep = clock, rng or random.Random(), sleep
        self.max_total_s = max_total_s

    # -- lookup -----------------------------------------------------------------------------

    def resolve(self, model: str | None, endpoint: str | None = None) -> ModelGroup:
        """The group a request's `model` names (without one: the first group serving `endpoint`)."""
        if not model:
            return next((g for g in self.groups if endpoint is None or g.serves(endpoint)), self.groups[0])
        group = self._by_name.get(model)
        if group is None:
            served = ", ".join(repr(g.name) for g in self.groups)
            raise InferdError(ErrorKind.INVALID_REQUEST, f"the model {model!r} does not exist; "
                                f"this server serves {served}", status=404, param="model",
                                code="model_not_found")
        return group

    def handles(self) -> list[Handle]:
        return [h for g in self.groups for h in g.handles]

    # -- the two calls ------------------------------------------------------------------------

    async def request(self, request: InferenceRequest, route: Route) -> dict:
        async def call(h: Handle, r: InferenceRequest, in_flight_before: int) -> dict:
            return await h.deployment.request(r)

        return await self._route(request, route, call)

    async def open_stream(self, request: InferenceRequest, route: Route) -> OpenStream:
        """A stream whose first chunk has arrived: every failure before it was retried or fell back."""
        async def call(h: Handle, r: InferenceRequest, in_flight_before: int) -> OpenStream:
            chunks = h.deployment.stream(r)
            started = self.clock()
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                raise InferdError(ErrorKind.SERVER, f"{h.name}: the stream ended before any chunk",
                                    status=502) from None
            except BaseException:
                await chunks.aclose()
                raise
            h.stats.observe_ttft(self.clock() - started, in_flight_before)
            return OpenStream(self, h, route, first, chunks)

        return await self._route(request, route, call)

    # -- routing ------------------------------------------------------------------------------

    async def _route(self, request: InferenceRequest, route: Route, call: Call):
        deadline = self.clock() + self.max_total_s
        first = self.resolve(request.model, request.endpoint)
        group = admit(self, first, route)
        tried: set[str] = set()
        while True:
            tried.add(group.name)
            try:
                result = await self._try_group(group, request, route, call, deadline)
            except InferdError as e:
                nxt = self._fallback(group, e, tried)
                if nxt is None:
                    raise
                log.info("%s failed (%s: %s); falling back to %s", group.name, e.kind.value, e.message, nxt.name)
                if self.metrics:
                    self.metrics.fallback(group.name, nxt.name, e.kind.value)
                route.fallback_from = route.fallback_from or group.name
                group = nxt
                continue
            route.group = group.name
            return result

    def _fallback(self, group: ModelGroup, error: InferdError, tried: set[str]) -> ModelGroup | None:
        if error.kind in _CLIENT_FAULTS:
            return None
        cls = _FALLBACK_CLASS.get(error.kind)
        chain = group.fallbacks.get(cls, []) if cls else []
        if not chain and error.kind is not ErrorKind.CONTEXT_LENGTH:
            chain = group.fallbacks.get("default", [])
        for name in chain:
            target = self._by_name[name]
            if target.name not in tried:
                return target
        return None

    async def _try_group(self, group: ModelGroup, request: InferenceRequest, route: Route, call: Call,
                         deadline: float):
        candidates = group.serves(request.endpoint)
        if not candidates:
            raise InferdError(ErrorKind.INVALID_REQUEST, f"the model {group.name!r} does not serve "
                                f"this endpoint", status=400, param="model")
        key = routing_key_for(request) if group.strategy.uses_routing_key else None
        last: InferdError | None = None
        for h in group.strategy.order(candidates, key):
            if not h.deployment.healthy:
                last = last or h.deployment.unavailable()
                continue
            for attempt in range(group.retry.max_retries + 1):
                if not h.breaker.allow():
                    last = last or InferdError(ErrorKind.SERVER, f"{h.name} is failing; its circuit is open",
                                                 status=503, retry_after=h.breaker.retry_in())
                    break
                try:
                    return await self._attempt(h, request, route, call)
                except InferdError as e:
                    last = e
                    if e.kind in _CLIENT_FAULTS or e.kind is ErrorKind.CONTEXT_LENGTH:
                        raise
                    if not e.kind.retryable:
                        break
                    delay = retry_delay(group.retry, attempt, e.retry_after, self.rng)
                    if delay is None or self.clock() + delay > deadline:
                        break
                    route.backoff_s += delay
                    await self.sleep(delay)
        raise last or InferdError(ErrorKind.SERVER, f"no deployment of {group.name!r} is available",
                                    status=503)

    async def _attempt(self, h: Handle, request: InferenceRequest, route: Route, call: Call):
        route.attempts += 1
        started = self.clock()
        in_flight_before = h.stats.started()
        try:
            result = await call(h, request, in_flight_before)
        except InferdError as e:
            route.errors.append(f"{h.name}: {e.kind.value}")
            h.stats.finished(self._record(h, e.kind, e.status, self.clock() - started))
            log.info("%s: attempt failed: %s (%s)", h.name, e.message, e.kind.value)
            raise
        except BaseException:
            h.breaker.record_released()  # cancelled by the client: no verdict on the deployment
            h.stats.finished(Outcome.CANCELLED)
            raise
        finally:
            route.upstream_s += self.clock() - started
        h.breaker.record_success()
        route.deployment = h.name
        if not isinstance(result, OpenStream):  # a stream keeps its slot until it is closed
            h.stats.finished(Outcome.SUCCESS)
            self._observe(h, "200", self.clock() - started)
        return result

    def _record(self, h: Handle, kind: ErrorKind, status: int, seconds: float) -> Outcome:
        """Account a failed attempt on the breaker and metrics; returns its outcome for the stats."""
        if kind in _BREAKER_FAILURES:
            h.breaker.record_failure()
            outcome = Outcome.FAILURE
        else:
            h.breaker.record_released()
            outcome = Outcome.CLIENT_ERROR if kind in _CLIENT_FAULTS else Outcome.FAILURE
        self._observe(h, str(status), seconds)
        return outcome

    def _observe(self, h: Handle, status: str, seconds: float) -> None:
        if self.metrics:
            self.metrics.attempt(h.name, status, seconds)

    def stream_ended(self, h: Handle, started: float, error: InferdError | None, complete: bool) -> None:
        """Account a stream that had its first chunk: broke (the deployment's fault), ended or was left."""
        if error is not None:
            h.stats.finished(self._record(h, error.kind, error.status, self.clock() - started))
        elif complete:
            h.stats.finished(Outcome.SUCCESS)
            self._observe(h, "200", self.clock() - started)
        else:
            h.stats.finished(Outcome.CANCELLED)


class OpenStream:
    """The rest of a stream after its first chunk; `aclose()` must run (it ends the accounting)."""

    def __init__(self, gateway: Gateway, handle: Handle, route: Route, first: dict,
                 chunks: AsyncIterator[dict]):
        self.gateway, self.handle, self.route = gateway, handle, route
        self.first, self._chunks = first, chunks
        self._started = gateway.clock()
        self._error: InferdError | None = None
        self._complete = self._closed = False

    async def __aiter__(self) -> AsyncIterator[dict]:
        yield self.first
        try:
            async for chunk in self._chunks:
                yield chunk
        except InferdError as e:
            self._error = e
            raise
        self._complete = True

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.gateway.stream_ended(self.handle, self._started, self._error, self._complete)
            await self._chunks.aclose()
