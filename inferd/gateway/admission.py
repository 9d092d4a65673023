"""Admission: send a request where it will get its first token in time, or refuse it quickly.

A group with `slo_ttft_ms` has local engines whose `LoadPredictor`s estimate the
time to first token a new request would see now (queue position / drain rate +
unloaded TTFT). If even the best of them would miss the SLO, the request goes to
the group's `degrade_to` target (a smaller local model, a remote provider), which
is admitted the same way; the response then carries `x-inferd-degraded-from`.
When no group in that chain can take it, the answer is 503 with a `Retry-After`
saying when the queue should have drained enough, clamped to what clients honour,
instead of a place at the end of a queue that would blow the SLO for everyone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inferd.gateway.backoff import clamp_retry_after
from inferd.wire.errors import ErrorKind, InferdError

if TYPE_CHECKING:
    from inferd.gateway.router import Gateway, ModelGroup, Route


def predicted_ttft(group: ModelGroup) -> tuple[float, float] | None:
    """(best predicted TTFT, its retry-after) over the group's healthy local engines; None: no prediction."""
    best = None
    for h in group.handles:
        predictor = h.stats.predictor
        if predictor is None or not h.deployment.healthy:
            continue
        ttft = predictor.predict_ttft(h.stats.in_flight)
        if best is None or ttft < best[0]:
            best = (ttft, predictor.retry_after(h.stats.in_flight))
    return best


def admit(gateway: Gateway, group: ModelGroup, route: Route) -> ModelGroup:
    """The group that should serve the request; raises 503 + Retry-After when none can in time."""
    current, seen = group, set()
    retry_after = None
    while True:
        seen.add(current.name)
        prediction = predicted_ttft(current) if current.slo_ttft_s is not None else None
        if prediction is None or prediction[0] <= current.slo_ttft_s:
            if current is not group:
                route.degraded_from = group.name
                if gateway.metrics:
                    gateway.metrics.degraded(group.name, current.name)
            return current
        retry_after = prediction[1] if retry_after is None else min(retry_after, prediction[1])
        target = gateway.resolve(current.degrade_to) if current.degrade_to else None
        if target is None or target.name in seen:
            if gateway.metrics:
                gateway.metrics.refused(group.name)
            raise InferdError(
                ErrorKind.OVERLOADED,
                f"{group.name!r} is at capacity: a new request would wait about {prediction[0]:.1f}s for its "
                f"first token (SLO {current.slo_ttft_s:.1f}s); retry later",
                status=503, code="model_overloaded", retry_after=clamp_retry_after(retry_after))
        current = target
