"""The router: one request in, an answer from the best deployment that can give one, or a clear error.

For a request naming a public model (or an alias) the `Gateway`:
1. admits it (`admission.py`): a group with a TTFT SLO whose local engines are
   predicted to miss it sends the request to its `degrade_to` group, or refuses
   it with 503 + a `Retry-After` computed from how fast the queue drains;
2. orders the group's deployments with the group's routing strategy and tries
   them in turn, skipping those whose circuit breaker is open or that are not
   accepting work; retryable failures (rate limit, overload, 5xx, connection)
   are retried on the same deployment with backoff that honours `Retry-After`,
   then the next deployment is tried (at once after a timeout: a deployment that
   let one run out has already cost its whole limit);
3. when a whole group fails, follows the group's fallback chain for that error
   class, or its `default` chain when the class has none (`context_length` errors
   go straight there: the same model would refuse again); content-policy and
   invalid-request errors go back to the client as is.

The router is the only retry loop: deployments never retry. A stream counts as
answered once its first chunk arrived: until then failures are retried or fall
back invisibly; after it, another deployment finishes the answer in the same
stream where one can (resume.py), and otherwise the failure ends the stream with
an error event (the API layer writes it): it is never passed off as a finished
answer.

A group with versions (gateway/versions.py) first picks the version a request goes
to (canary.py: sticky per API key, or the version the request is pinned to) and
tries that version's deployments, then, for a request that is not pinned, the
stable version's: a failing canary costs its clients nothing, and the failure
counts against the canary's health.

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
from inferd.gateway.canary import Assignment, VersionHealth
from inferd.gateway.circuit_breaker import CircuitBreaker
from inferd.gateway.config import CanarySpec
from inferd.gateway.metrics import GatewayMetrics
from inferd.gateway.resume import Mismatch, PrefixFilter, Progress, blocker, continuation
from inferd.gateway.stats import DeploymentStats, Outcome
from inferd.gateway.strategies import RoutingStrategy, routing_key_for
from inferd.providers.base import Deployment, usage_unknown_chunk
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
class BrokenPart:
    """What a deployment whose stream broke had delivered; it sent no usage, so its prompt is estimated
    from the continuation's (the same conversation, without the prefill)."""

    deployment: str
    completion_tokens: int
    prompt_tokens: int = 0


@dataclass
class Route:
    """What the gateway decided for one request, and what it cost in time."""

    requested_model: str | None
    endpoint: str
    group: str | None = None              # the group that answered
    deployment: str | None = None         # the deployment that answered
    version: str | None = None            # the model version it belongs to
    attempts: int = 0
    fallback_from: str | None = None      # the group first asked, when a fallback answered
    degraded_from: str | None = None      # the group whose SLO sent the request elsewhere
    upstream_s: float = 0.0               # time inside deployment calls (all attempts)
    backoff_s: float = 0.0                # time sleeping between attempts
    errors: list[str] = field(default_factory=list)
    # a stream finished by another deployment after it broke: the broken parts, in order; the usage
    # the client gets counts them too
    broken_parts: list[BrokenPart] = field(default_factory=list)

    @property
    def deployments(self) -> list[str]:
        """Every deployment that delivered part of the answer, in order."""
        return [p.deployment for p in self.broken_parts] + ([self.deployment] if self.deployment else [])

    def headers(self) -> dict[str, str]:
        h = {"x-inferd-attempts": str(self.attempts)}
        if self.deployment:
            h["x-inferd-deployment"] = self.deployment
        if self.group:
            h["x-inferd-model-group"] = self.group
        if self.version:
            h["x-inferd-model-version"] = self.version
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
    version: str | None = None            # the model version it serves (None: a group without versions)
    health: VersionHealth | None = None   # shared by the handles of one version

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
    # which version gets a request; `handles` holds every loaded version's, draining ones included
    assignment: Assignment = field(default_factory=Assignment)
    canary_policy: CanarySpec = field(default_factory=CanarySpec)

    def serves(self, endpoint: str) -> list[Handle]:
        return [h for h in self.handles if endpoint in h.deployment.endpoints]

    def serving(self) -> list[Handle]:
        """The handles of the stable and canary versions (all of them in a group without versions)."""
        if self.assignment.stable is None:
            return list(self.handles)
        return [h for h in self.handles if h.version in self.assignment.serving]

    def by_version(self, candidates: list[Handle], request: InferenceRequest, rng: random.Random
                   ) -> tuple[VersionHealth | None, list[Handle], list[Handle]]:
        """The chosen version's health, its candidates, and the stable version's to spill over to."""
        a = self.assignment
        if a.stable is None:
            return None, candidates, []
        chosen = request.version if request.version in {h.version for h in candidates} else None
        pinned = chosen is not None
        if not pinned:
            chosen = a.pick(self.name, request.caller.key_id if request.caller is not None else None, rng)
        mine = [h for h in candidates if h.version == chosen]
        spill = [] if pinned or chosen == a.stable else [h for h in candidates if h.version == a.stable]
        return (mine[0].health if mine else None), mine, spill


Call = Callable[[Handle, InferenceRequest, int], Awaitable[Any]]


class Gateway:
    def __init__(self, groups: list[ModelGroup], *, metrics: GatewayMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, max_total_s: float = 600.0):
        self.set_groups(groups)
        # the replica pools of `provider: ray` deployments (gateway/replicas.py), by deployment name: their
        # replicas are handles of their groups like any other; gateway/versions.py adds a version's pools
        # when it loads and removes them when it unloads, and closes them (this registry owns nothing)
        self.pools: dict = {}
        self.metrics = metrics
        self.clock, self.rng, self.sleep = clock, rng or random.Random(), sleep
        self.max_total_s = max_total_s

    def set_groups(self, groups: list[ModelGroup]) -> None:
        """Serve these groups from now on (a config reload); requests already routed keep theirs."""
        self.groups = groups
        self._by_name = {n: g for g in groups for n in (g.name, *g.aliases)}

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
        """Every deployment the gateway holds, draining versions' included."""
        return [h for g in self.groups for h in g.handles]

    def serving_handles(self) -> list[Handle]:
        """The deployments new requests may go to: what health and readiness are about."""
        return [h for g in self.groups for h in g.serving()]

    def pool(self, name: str):
        """The replica pool of the Ray deployment called `name`."""
        pool = self.pools.get(name)
        if pool is None:
            known = ", ".join(repr(n) for n in self.pools) or "none"
            raise InferdError(ErrorKind.INVALID_REQUEST, f"no provider: ray deployment is named {name!r}; "
                                f"this server has {known}", status=404, param="name", code="not_found")
        return pool

    # -- the two calls ------------------------------------------------------------------------

    async def request(self, request: InferenceRequest, route: Route) -> dict:
        async def call(h: Handle, r: InferenceRequest, in_flight_before: int) -> dict:
            return await h.deployment.request(r)

        return await self._route(request, route, call)

    async def open_stream(self, request: InferenceRequest, route: Route) -> OpenStream:
        """A stream whose first chunk has arrived: every failure before it was retried or fell back."""
        async def call(h: Handle, r: InferenceRequest, in_flight_before: int) -> OpenStream:
            first, chunks = await self._first_chunk(h, r, in_flight_before)
            return OpenStream(self, h, route, request, first, chunks)

        return await self._route(request, route, call)

    async def _first_chunk(self, h: Handle, r: InferenceRequest, in_flight_before: int
                           ) -> tuple[dict, AsyncIterator[dict]]:
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
        ttft = self.clock() - started
        h.stats.observe_ttft(ttft, in_flight_before)
        if h.health is not None:
            h.health.ttfts.append(ttft)
        return first, chunks

    async def resume(self, request: InferenceRequest, route: Route, progress: Progress, error: InferdError,
                     broken: set[str]) -> tuple[Handle, dict, AsyncIterator[dict], PrefixFilter] | None:
        """Another deployment's stream that continues a broken one (its first chunk in), or None: the
        group's other deployments first, then the fallback chain for `error`'s class."""
        async def call(h: Handle, r: InferenceRequest, in_flight_before: int):
            cont = continuation(request, progress, h.deployment.takes_prefill)
            first, chunks = await self._first_chunk(h, cont.request, in_flight_before)
            return h, first, chunks, PrefixFilter(cont.expected, cont.strict)

        deadline = self.clock() + self.max_total_s
        group: ModelGroup | None = self._by_name.get(route.group)  # None: the group went in a config reload
        tried: set[str] = set()
        while group is not None:
            tried.add(group.name)
            try:
                result = await self._try_group(group, request, route, call, deadline, exclude=broken)
            except InferdError as e:
                log.info("%s cannot continue the broken stream (%s: %s)", group.name, e.kind.value, e.message)
                group = self._fallback(group, error, tried)
                continue
            if group.name != route.group:
                route.fallback_from = route.fallback_from or route.group
                route.group = group.name
            return result
        return None

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
        chain = group.fallbacks.get(cls) if cls else None
        if chain is None:  # `default` is the chain of every class that has none of its own
            chain = group.fallbacks.get("default", [])
        for name in chain:
            target = self._by_name.get(name)  # None: a group that failed to load in a config reload
            if target is not None and target.name not in tried:
                return target
        return None

    async def _try_group(self, group: ModelGroup, request: InferenceRequest, route: Route, call: Call,
                         deadline: float, exclude: set[str] = frozenset()):
        candidates = [h for h in group.serves(request.endpoint) if h.name not in exclude]
        if not candidates:
            raise InferdError(ErrorKind.INVALID_REQUEST, f"the model {group.name!r} does not serve "
                                f"this endpoint", status=400, param="model")
        key = routing_key_for(request) if group.strategy.uses_routing_key else None
        health, mine, spill = group.by_version(candidates, request, self.rng)
        order = group.strategy.order(mine, key) + group.strategy.order(spill, key)
        try:
            result, h = await self._try_handles(group, order, request, route, call, deadline)
        except InferdError as e:
            if health is not None and e.kind not in _CLIENT_FAULTS and e.kind is not ErrorKind.CONTEXT_LENGTH:
                health.outcome(False)  # the request's own fault says nothing about the version
            raise
        if health is not None:
            health.outcome(h.health is health)
        return result

    async def _try_handles(self, group: ModelGroup, order: list[Handle], request: InferenceRequest, route: Route,
                           call: Call, deadline: float):
        last: InferdError | None = None
        for h in order:
            if not h.deployment.healthy:
                last = last or h.deployment.unavailable()
                continue
            for attempt in range(group.retry.max_retries + 1):
                if not h.breaker.allow():
                    last = last or InferdError(ErrorKind.SERVER, f"{h.name} is failing; its circuit is open",
                                                 status=503, retry_after=h.breaker.retry_in())
                    break
                try:
                    return await self._attempt(h, request, route, call), h
                except InferdError as e:
                    last = e
                    if e.kind in _CLIENT_FAULTS or e.kind is ErrorKind.CONTEXT_LENGTH:
                        raise
                    if not e.kind.retryable or e.kind is ErrorKind.TIMEOUT:
                        break  # a deployment that let a timeout run out would likely do it again: next one
                    if not h.deployment.healthy:
                        break  # it went down (a dead engine): the next one, without waiting
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
        route.deployment, route.version = h.name, h.version
        if isinstance(result, dict):  # a stream keeps its slot until it is closed
            h.stats.finished(Outcome.SUCCESS)
            self._observe(h, "200", self.clock() - started)
        return result

    def _record(self, h: Handle, kind: ErrorKind, status: int, seconds: float) -> Outcome:
        """Account a failed attempt on the breaker and metrics; returns its outcome for the stats.

        A deployment that says it is down (a dead engine) is skipped for that already; its failures
        are not held against it by the breaker, or a replica restarted in seconds would stay shut
        out for the breaker's cooldown."""
        if kind in _BREAKER_FAILURES and h.deployment.healthy:
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
    """The rest of a stream after its first chunk; `aclose()` must run (it ends the accounting).

    When the deployment's stream breaks after chunks reached the client, another deployment
    continues the answer (resume.py) and its chunks follow in the same stream; the last chunk
    with a finish_reason then names every deployment that answered (`inferd_deployments`) and the
    usage chunk counts all parts. When none can, the error is raised as before.
    """

    def __init__(self, gateway: Gateway, handle: Handle, route: Route, request: InferenceRequest, first: dict,
                 chunks: AsyncIterator[dict]):
        self.gateway, self.handle, self.route, self.request = gateway, handle, route, request
        self.first, self._chunks = first, chunks
        self._started = gateway.clock()
        self._error: InferdError | None = None
        self._complete = self._closed = False
        self._progress = Progress(request.endpoint, blocker=blocker(request))
        self._sent_before_resume = 0  # tokens the client had when the current continuation started

    async def __aiter__(self) -> AsyncIterator[dict]:
        self._progress.observe(self.first)
        yield self.first
        broken: set[str] = set()
        prefix: PrefixFilter | None = None
        broke_with: InferdError | None = None
        while True:
            try:
                async for chunk in self._chunks:
                    if prefix is not None:
                        chunk = self._stitched(chunk, prefix)
                        if chunk is None:
                            continue
                    self._progress.observe(chunk)
                    yield chunk
                if prefix is not None:
                    prefix.finish()
                self._complete = True
                return
            except InferdError as e:
                error = e
                if self._progress.finished:  # the answer is whole: only its end (usage, [DONE]) went missing
                    self._error = error
                    yield usage_unknown_chunk(self.first)
                    return
            except Mismatch:
                # the regenerated answer differs from what the client has: end with the break that
                # started it; the continuing deployment itself did nothing wrong
                self._complete = True
                raise broke_with from None
            broke_with = error
            prefix = await self._resume(error, broken)
            if prefix is None:
                raise error

    async def _resume(self, error: InferdError, broken: set[str]) -> PrefixFilter | None:
        """Account the broken part and switch to a deployment that continues it, if there is one."""
        self._error = error
        progress = self._progress
        if progress.blocker:
            return None
        broken.add(self.handle.name)
        found = await self.gateway.resume(self.request, self.route, progress, error, broken)
        if found is None:
            return None
        log.info("%s broke after %d tokens (%s); %s continues the answer", self.handle.name, progress.tokens,
                 error.kind.value, found[0].name)
        self.gateway.stream_ended(self.handle, self._started, error, False)
        await self._chunks.aclose()
        self.route.broken_parts.append(BrokenPart(self.handle.name, progress.tokens - self._sent_before_resume))
        self.handle, first, chunks, prefix = found
        self._started, self._error, self._sent_before_resume = self.gateway.clock(), None, progress.tokens
        self._chunks = _prepend(first, chunks)
        return prefix

    def _stitched(self, chunk: dict, prefix: PrefixFilter) -> dict | None:
        """A continuation's chunk as part of the one answer: the text already sent dropped, the role
        not announced again, the usage of all parts, the deployments named at the end."""
        if chunk.get("usage") and not chunk.get("choices"):
            return {**chunk, "usage": self._total_usage(chunk["usage"], prefilled=not prefix.strict)}
        choices = []
        for choice in chunk.get("choices") or ():
            choice = dict(choice)
            if self.request.endpoint == "chat":
                delta = {k: v for k, v in (choice.get("delta") or {}).items() if k != "role"}
                if delta.get("content"):
                    delta["content"] = prefix.take(delta["content"])
                choice["delta"] = delta
                empty = not delta.get("content") and len(delta) <= 1
            else:
                choice["text"] = prefix.take(choice["text"]) if choice.get("text") else ""
                empty = not choice["text"]
            if empty and choice.get("finish_reason") is None:
                continue
            choices.append(choice)
        if not choices:
            return None
        out = {**chunk, "choices": choices}
        if any(c.get("finish_reason") is not None for c in choices):
            prefix.finish()
            out["inferd_deployments"] = self.route.deployments
        return out

    def _total_usage(self, usage: dict, prefilled: bool) -> dict:
        """The continuation's usage plus the broken parts' (their providers billed their prompts too)."""
        total = dict(usage)
        prompt = int(usage.get("prompt_tokens") or 0)
        if prefilled:  # the continuation's prompt held the answer so far
            prompt = max(0, prompt - self._sent_before_resume)
        for part in self.route.broken_parts:
            part.prompt_tokens = prompt
            total["prompt_tokens"] = total.get("prompt_tokens", 0) + part.prompt_tokens
            total["completion_tokens"] = total.get("completion_tokens", 0) + part.completion_tokens
        total["total_tokens"] = total.get("prompt_tokens", 0) + total.get("completion_tokens", 0)
        return total

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.gateway.stream_ended(self.handle, self._started, self._error, self._complete)
            await self._chunks.aclose()


async def _prepend(first: dict, rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    yield first
    async for chunk in rest:
        yield chunk
