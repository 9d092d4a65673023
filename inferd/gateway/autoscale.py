"""The autoscaler's rule: how many replicas a Ray deployment should have for its queue.

Parts:
- `Load`: what the gateway sees of the replicas now: how many are up, the requests
  in flight on them (running or waiting in their engines) and how many one replica
  runs at once (its `max_num_seqs`);
- `Autoscaler.decide(load)`: the `ScaleDecision`, one frozen object that is both
  logged and acted on (gateway/replicas.py).

A replica is sized for `capacity + target_queue` requests: those it runs at once
and a short queue. The replicas wanted are the requests in flight over that size,
rounded up, within `[min_replicas, max_replicas]`. Scaling up waits until more
have been wanted for `upscale_delay_s` without a break, scaling down until fewer
have been for `downscale_delay_s` (a burst is not a trend; model loads are not
free), and then moves to what is wanted now. The clock is injected, so the rule
is tested exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    replicas: int        # replicas up or starting
    in_flight: int       # requests on them, running or queued
    capacity: int        # requests one replica runs at once


@dataclass(frozen=True)
class ScaleDecision:
    replicas: int        # now
    desired: int         # after this decision (== replicas: stay)
    wanted: int          # what the load alone asks for
    in_flight: int
    reason: str

    @property
    def changes(self) -> bool:
        return self.desired != self.replicas


class Autoscaler:
    def __init__(self, min_replicas: int, max_replicas: int, target_queue: float, upscale_delay_s: float,
                 downscale_delay_s: float, clock: Callable[[], float] = time.monotonic):
        if not 1 <= min_replicas <= max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {min_replicas}, {max_replicas}")
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.target_queue = target_queue
        self.upscale_delay_s, self.downscale_delay_s = upscale_delay_s, downscale_delay_s
        self.clock = clock
        # (more?, since when) more (or fewer) replicas have been wanted without a break; None: as many as now
        self._wanting: tuple[bool, float] | None = None

    def set_bounds(self, min_replicas: int, max_replicas: int) -> None:
        if not 1 <= min_replicas <= max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {min_replicas}, {max_replicas}")
        self.min_replicas, self.max_replicas = min_replicas, max_replicas

    def wanted(self, load: Load) -> int:
        per_replica = max(1.0, load.capacity + self.target_queue)
        return min(self.max_replicas, max(self.min_replicas, math.ceil(load.in_flight / per_replica)))

    def decide(self, load: Load) -> ScaleDecision:
        now = self.clock()
        wanted = self.wanted(load)
        n = load.replicas

        def decision(desired: int, reason: str) -> ScaleDecision:
            return ScaleDecision(n, desired, wanted, load.in_flight, reason)

        if not self.min_replicas <= n <= self.max_replicas:  # the bounds moved: follow them at once
            self._wanting = None
            return decision(min(self.max_replicas, max(self.min_replicas, n)), "outside the bounds")
        if wanted == n:
            self._wanting = None
            return decision(n, "sized for the load")
        up = wanted > n
        if self._wanting is None or self._wanting[0] != up:  # a change of mind starts the wait again
            self._wanting = (up, now)
        if now - self._wanting[1] < (self.upscale_delay_s if up else self.downscale_delay_s):
            return decision(n, f"{'more' if up else 'fewer'} wanted, not for long enough yet")
        self._wanting = None
        return decision(wanted, f"{load.in_flight} in flight need {'' if up else 'only '}{wanted} replicas")
