"""Gateway metrics for /metrics: what happened to each attempt on each deployment, and why.

Per deployment: attempts by HTTP status (200 for an answer), attempt latency, the
circuit breaker's state (0 closed, 1 open, 2 half-open) and requests in flight (the last two
refreshed at scrape time, so a circuit that turned half-open while idle shows it);
per group: fallbacks (from, to, error class), degradations (from, to) and requests
refused because nothing could take them in time. They live in the app's registry
beside the engine metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry):
        d = ["deployment"]
        self._attempts = Counter("inferd:gateway_attempts", "Attempts on a deployment by status.",
                                 [*d, "status"], registry=registry)
        self._latency = Histogram("inferd:gateway_attempt_latency_seconds",
                                  "Attempt latency on a deployment (s): the whole answer, or a stream's "
                                  "whole life.", d, buckets=_LATENCY, registry=registry)
        self._circuit = Gauge("inferd:gateway_circuit_state",
                              "Circuit breaker state: 0 closed, 1 open, 2 half-open.", d, registry=registry)
        self.in_flight = Gauge("inferd:gateway_in_flight", "Requests in flight on a deployment.", d,
                               registry=registry)
        self._fallbacks = Counter("inferd:gateway_fallbacks", "Requests that fell back to another group.",
                                  ["from_group", "to_group", "reason"], registry=registry)
        self._degraded = Counter("inferd:gateway_degradations",
                                 "Requests sent to a group's degrade target by its TTFT SLO.",
                                 ["from_group", "to_group"], registry=registry)
        self._refused = Counter("inferd:gateway_refused", "Requests refused with 503: nothing could "
                                "take them within the SLO.", ["group"], registry=registry)

    def attempt(self, deployment: str, status: str, seconds: float) -> None:
        self._attempts.labels(deployment, status).inc()
        self._latency.labels(deployment).observe(seconds)

    def circuit(self, deployment: str, state: int) -> None:
        self._circuit.labels(deployment).set(state)

    def fallback(self, from_group: str, to_group: str, reason: str) -> None:
        self._fallbacks.labels(from_group, to_group, reason).inc()

    def degraded(self, from_group: str, to_group: str) -> None:
        self._degraded.labels(from_group, to_group).inc()

    def refused(self, group: str) -> None:
        self._refused.labels(group).inc()
