"""The router's decisions, exactly: scripted in-process deployments, a fake clock, no sleeping.

Each `Scripted` deployment answers from a queue of outcomes (an answer, or a
`InferdError` of some kind), so every retry / fallback / breaker / admission
rule is checked by what was called and what the `Route` recorded. The same rules
against real HTTP upstreams with injected faults are in test_gateway_faults.py.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from inferd.gateway.backoff import RetryPolicy
from inferd.gateway.circuit_breaker import CircuitBreaker
from inferd.gateway.router import Gateway, Handle, ModelGroup, Route
from inferd.gateway.stats import DeploymentStats, LoadPredictor
from inferd.gateway.strategies import make_strategy
from inferd.providers.base import Deployment
from inferd.wire.errors import ErrorKind, InferdError
from tests.typed import typed

HI = [{"role": "user", "content": "hi"}]


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Scripted(Deployment):
    def __init__(self, name: str, *outcomes):
        self.name = name
        self.outcomes = list(outcomes)
        self.calls = 0

    def _next(self):
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if isinstance(outcome, InferdError):
            raise outcome
        return outcome

    async def request(self, request):
        self._next()
        return {"object": "chat.completion", "model": self.name, "choices": []}

    async def stream(self, request):
        outcome = self._next()
        yield {"model": self.name, "choices": [{"index": 0, "delta": {"content": "a"}}]}
        if outcome == "cut":
            raise InferdError(ErrorKind.CONNECTION, "stream cut", status=502)
        yield {"model": self.name, "choices": [], "usage": {"completion_tokens": 1}}


def err(kind: ErrorKind, status: int = 500, retry_after: float | None = None) -> InferdError:
    return InferdError(kind, kind.value, status=status, retry_after=retry_after)


def group(name: str, *deployments: Deployment, clock: FakeClock, **kw) -> ModelGroup:
    handles = [Handle(d, breaker=CircuitBreaker(kw.pop("threshold", 3), 30.0, clock=clock),
                      stats=DeploymentStats()) for d in deployments]
    return ModelGroup(name=name, handles=handles, strategy=make_strategy("weighted_random", random.Random(0)),
                      retry=kw.pop("retry", RetryPolicy(max_retries=2, base_s=0.5, max_s=4)), **kw)


def gateway(*groups: ModelGroup, clock: FakeClock) -> Gateway:
    return Gateway(list(groups), clock=clock, rng=random.Random(1), sleep=clock.sleep)


def run(gw: Gateway, model: str = "a") -> tuple[dict, Route]:
    route = Route(model, "chat")
    return asyncio.run(gw.request(typed("chat", {"model": model, "messages": HI}), route)), route


def test_a_server_error_is_retried_with_backoff_then_answers():
    clock = FakeClock()
    d = Scripted("d", err(ErrorKind.SERVER), err(ErrorKind.SERVER))
    answer, route = run(gateway(group("a", d, clock=clock), clock=clock))
    assert answer["model"] == "d" and d.calls == 3 and route.attempts == 3
    assert len(clock.slept) == 2 and all(0 <= s <= 1.0 for s in clock.slept)
    assert route.backoff_s == pytest.approx(sum(clock.slept))


def test_retry_after_is_honoured_and_a_long_one_moves_on():
    clock = FakeClock()
    d = Scripted("d", err(ErrorKind.RATE_LIMIT, 429, retry_after=3))
    run(gateway(group("a", d, clock=clock), clock=clock))
    assert clock.slept and clock.slept[0] >= 3

    clock = FakeClock()
    slow = Scripted("slow", err(ErrorKind.RATE_LIMIT, 429, retry_after=600))
    other = Scripted("other")
    g = group("a", slow, other, clock=clock)
    g.strategy = make_strategy("lowest_cost")
    g.handles[0].cost_per_mtok, g.handles[1].cost_per_mtok = 1.0, 2.0  # the rate-limited one first
    answer, route = run(gateway(g, clock=clock), "a")
    assert answer["model"] == "other" and slow.calls == 1 and clock.slept == []


def test_context_length_goes_to_its_fallback_without_retrying():
    clock = FakeClock()
    small = Scripted("small", err(ErrorKind.CONTEXT_LENGTH, 400))
    big = Scripted("big")
    gw = gateway(group("a", small, clock=clock, fallbacks={"context_length": ["long"], "default": ["other"]}),
                 group("long", big, clock=clock), group("other", Scripted("o"), clock=clock), clock=clock)
    answer, route = run(gw)
    assert answer["model"] == "big" and small.calls == 1
    assert route.fallback_from == "a" and route.group == "long" and route.deployment == "big"


def test_content_policy_and_bad_requests_are_never_retried_or_fallen_back():
    for kind, status in ((ErrorKind.CONTENT_POLICY, 400), (ErrorKind.INVALID_REQUEST, 422)):
        clock = FakeClock()
        d = Scripted("d", err(kind, status))
        fb = Scripted("fb")
        gw = gateway(group("a", d, clock=clock, fallbacks={"default": ["b"]}), group("b", fb, clock=clock),
                     clock=clock)
        with pytest.raises(InferdError) as e:
            run(gw)
        assert e.value.kind is kind and e.value.status == status
        assert d.calls == 1 and fb.calls == 0


def test_exhausted_group_falls_back_and_headers_say_so():
    clock = FakeClock()
    down = Scripted("down", *[err(ErrorKind.CONNECTION, 502)] * 3)
    backup = Scripted("backup")
    gw = gateway(group("a", down, clock=clock, fallbacks={"default": ["b"]}), group("b", backup, clock=clock),
                 clock=clock)
    answer, route = run(gw)
    assert down.calls == 3 and backup.calls == 1
    assert route.headers()["x-inferd-fallback-from"] == "a"
    assert route.headers()["x-inferd-deployment"] == "backup"


def test_circuit_opens_skips_then_probes_once_after_cooldown():
    clock = FakeClock()
    flaky = Scripted("flaky", *[err(ErrorKind.SERVER, 503)] * 3)
    g = group("a", flaky, clock=clock, threshold=3, retry=RetryPolicy(max_retries=0))
    gw = gateway(g, clock=clock)
    for _ in range(3):
        with pytest.raises(InferdError):
            run(gw)
    assert flaky.calls == 3
    with pytest.raises(InferdError) as e:  # open: not even tried
        run(gw)
    assert flaky.calls == 3 and "circuit is open" in e.value.message
    clock.now += 31  # cooldown over: one probe, it succeeds, the circuit closes
    answer, _ = run(gw)
    assert flaky.calls == 4 and g.handles[0].breaker.gauge_value == 0


def test_stream_failure_before_first_chunk_is_invisible_after_it_is_not():
    clock = FakeClock()
    d = Scripted("d", err(ErrorKind.SERVER, 500), "cut")
    gw = gateway(group("a", d, clock=clock), clock=clock)

    async def consume():
        route = Route("a", "chat")
        stream = await gw.open_stream(typed("chat", {"model": "a", "messages": HI}), route)
        got = []
        try:
            async for chunk in stream:
                got.append(chunk)
        finally:
            await stream.aclose()
        return got

    with pytest.raises(InferdError) as e:
        asyncio.run(consume())
    assert e.value.kind is ErrorKind.CONNECTION and d.calls == 2
    handle = gw.groups[0].handles[0]
    assert handle.stats.in_flight == 0 and handle.breaker.consecutive_failures == 1
    chunks = asyncio.run(consume())  # a clean one ends with its usage chunk
    assert chunks[-1]["usage"] == {"completion_tokens": 1} and handle.stats.in_flight == 0


def test_admission_degrades_over_the_slo_and_refuses_when_nothing_can_take_it():
    clock = FakeClock()
    local, small = Scripted("local"), Scripted("small")
    g = group("a", local, clock=clock, slo_ttft_s=1.0, degrade_to="b")
    predictor = LoadPredictor(capacity=1, clock=clock)
    g.handles[0].stats = DeploymentStats(predictor=predictor)
    gw = gateway(g, group("b", small, clock=clock), clock=clock)
    answer, route = run(gw)  # idle: admitted
    assert answer["model"] == "local" and route.degraded_from is None
    for _ in range(4):  # a drain rate of 2 requests/s
        clock.now += 0.5
        predictor.record_completion()
    for _ in range(5):  # 5 completions in 2 s (the first request too): 5 in line at 2.5/s -> 2 s > 1 s
        g.handles[0].stats.started()
    answer, route = run(gw)
    assert answer["model"] == "small" and route.degraded_from == "a" and route.group == "b"

    g.degrade_to = None
    with pytest.raises(InferdError) as e:
        run(gw)
    assert e.value.status == 503 and e.value.kind is ErrorKind.OVERLOADED and e.value.retry_after == 2


def test_unknown_model_is_404_naming_what_exists():
    clock = FakeClock()
    gw = gateway(group("a", Scripted("d"), clock=clock, aliases=["alias"]), clock=clock)
    assert run(gw, "alias")[1].group == "a"
    with pytest.raises(InferdError) as e:
        run(gw, "nope")
    assert e.value.status == 404 and e.value.code == "model_not_found" and "'a'" in e.value.message
