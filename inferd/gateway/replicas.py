"""The replicas of one `provider: ray` deployment: handles in its group, started, retired and scaled.

A `ReplicaPool` owns the replicas of one Ray deployment of a model group. Each
replica (providers/ray_replica.py: an engine core on a Ray actor) is one more
`Handle` in the group, named `<deployment>#<slot>`, so the group's routing
strategy (prefix affinity included), retries, breakers, admission control and
metrics treat replicas as they treat any local engine; nothing in the router
knows about Ray. Slots are the numbers 0..n-1: a new replica takes the lowest
free one and scaling down retires the highest, so a replica's name, and with it
the prefix-affinity keys it is first for, stays put while others come and go.

The count changes three ways, all through `target`:
- at start, `replicas` of them are started together (a config starts whole or not at all);
- at run time, `set_target` (the admin API, api/routes_replicas.py) moves the count or the
  autoscaler's bounds;
- with load, when `min_replicas < max_replicas`: every `interval_s` the pool asks its
  `Autoscaler` (gateway/autoscale.py) for a `ScaleDecision` on the requests in flight.

Reconciling starts replicas for missing slots (a replica joins the group once its
model is loaded; one that fails to start is tried again with backoff while its
slot is still wanted) and retires surplus ones: a retired replica leaves the group
at once, so it gets no new request, finishes what it has (up to `drain_s`), and
its actor is released.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from inferd.gateway.autoscale import Autoscaler, Load
from inferd.gateway.router import Handle, ModelGroup
from inferd.providers.base import Deployment

log = logging.getLogger(__name__)

START_RETRY_S = (2.0, 60.0)  # first and longest wait before starting a failed replica again


class ReplicaPool:
    def __init__(self, name: str, group: ModelGroup, make_replica: Callable[[int], Deployment],
                 make_handle: Callable[[Deployment], Handle], *, replicas: int, autoscaler: Autoscaler,
                 interval_s: float = 1.0, drain_s: float = 30.0):
        self.name, self.group = name, group
        self._make_replica, self._make_handle = make_replica, make_handle
        self.autoscaler = autoscaler
        self.target = replicas
        self.interval_s, self.drain_s = interval_s, drain_s
        self.ready: dict[int, Handle] = {}
        self._starting: dict[int, asyncio.Task] = {}
        self._retiring: set[asyncio.Task] = set()
        self._on_done = None
        self._scaler: asyncio.Task | None = None
        self._stopped = False
        self.last_decision = None

    # -- what the pool shows ------------------------------------------------------------------

    @property
    def handles(self) -> list[Handle]:
        return list(self.ready.values())

    @property
    def autoscaling(self) -> bool:
        return self.autoscaler.min_replicas < self.autoscaler.max_replicas

    def status(self) -> dict:
        d = self.last_decision
        return {"id": self.name, "object": "replica_pool", "model": self.group.name, "replicas": self.target,
                "min_replicas": self.autoscaler.min_replicas, "max_replicas": self.autoscaler.max_replicas,
                "ready": len(self.ready), "starting": len(self._starting), "retiring": len(self._retiring),
                "autoscaling": self.autoscaling,
                "last_decision": None if d is None else {"replicas": d.replicas, "desired": d.desired,
                                                          "in_flight": d.in_flight, "reason": d.reason},
                "data": [{"id": h.name, "healthy": h.deployment.healthy, "in_flight": h.stats.in_flight,
                          "placement": h.deployment.placement()} for _, h in sorted(self.ready.items())]}

    def observe_requests(self, on_done) -> None:
        """Have every replica, now and later, report its finished requests' timings to `on_done`."""
        self._on_done = on_done
        for h in self.ready.values():
            h.deployment.observe_requests(on_done)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the first `target` replicas together; if one fails, none is kept and the error is raised."""
        made = [self._make_replica(slot) for slot in range(self.target)]
        results = await asyncio.gather(*(d.start() for d in made), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            await asyncio.gather(*(d.aclose() for d in made), return_exceptions=True)
            raise failed
        for slot, d in enumerate(made):
            self._join(slot, d)
        if self.autoscaling:
            self._scaler = asyncio.create_task(self._autoscale(), name=f"inferd-autoscale-{self.name}")

    def set_target(self, replicas: int | None = None, min_replicas: int | None = None,
                   max_replicas: int | None = None) -> None:
        """Move the count and/or the autoscaler's bounds; ValueError (nothing changed) when they disagree."""
        lo = self.autoscaler.min_replicas if min_replicas is None else min_replicas
        hi = self.autoscaler.max_replicas if max_replicas is None else max_replicas
        n = min(hi, max(lo, self.target)) if replicas is None else replicas
        if not 1 <= lo <= n <= hi:
            raise ValueError(f"need 1 <= min_replicas <= replicas <= max_replicas, got {lo}, {n}, {hi}")
        was_autoscaling = self.autoscaling
        self.autoscaler.set_bounds(lo, hi)
        self.target = n
        log.info("%s: %d replica(s) wanted (bounds %d..%d)", self.name, n, lo, hi)
        if self.autoscaling and not was_autoscaling and not self._stopped:
            self._scaler = asyncio.create_task(self._autoscale(), name=f"inferd-autoscale-{self.name}")
        self._reconcile()

    def stop_scaling(self) -> None:
        """At shutdown: no replica starts from now on; those starting are given up."""
        self._stopped = True
        if self._scaler is not None:
            self._scaler.cancel()
        for task in self._starting.values():
            task.cancel()

    async def aclose(self) -> None:
        """Release every replica: those up, starting and retiring."""
        self.stop_scaling()
        tasks = [*self._starting.values(), *([self._scaler] if self._scaler else [])]
        await asyncio.gather(*tasks, return_exceptions=True)
        ready, self.ready = list(self.ready.values()), {}
        for h in ready:
            self._leave(h)
        await asyncio.gather(*(h.deployment.aclose() for h in ready), *self._retiring, return_exceptions=True)

    # -- reconciling ----------------------------------------------------------------------------

    def _reconcile(self) -> None:
        if self._stopped:
            return
        while len(self.ready) + len(self._starting) < self.target:
            slot = min(s for s in range(self.target + len(self._starting) + len(self.ready) + 1)
                       if s not in self.ready and s not in self._starting)
            self._starting[slot] = asyncio.create_task(self._start_slot(slot), name=f"inferd-start-{self.name}#{slot}")
        while len(self.ready) + len(self._starting) > self.target:
            slot = max([*self.ready, *self._starting])
            if slot in self._starting:
                self._starting.pop(slot).cancel()  # its task releases what it started
            else:
                self._retire(self.ready.pop(slot))

    async def _start_slot(self, slot: int) -> None:
        delay, longest = START_RETRY_S
        try:
            while True:
                replica = self._make_replica(slot)
                try:
                    await replica.start()
                except asyncio.CancelledError:
                    await replica.aclose()
                    raise
                except Exception as e:  # noqa: BLE001 - no resources yet, a node going away: try again
                    await replica.aclose()
                    log.error("%s: replica %d did not start: %s; trying again in %.0fs", self.name, slot, e, delay)
                    await asyncio.sleep(delay)
                    delay = min(longest, delay * 2)
                    continue
                self._forget_start(slot)
                self._join(slot, replica)
                log.info("%s: replica %s is up (%d ready)", self.name, replica.name, len(self.ready))
                return
        finally:
            self._forget_start(slot)

    def _forget_start(self, slot: int) -> None:
        # only this task's own entry: a cancelled start may end after a new one took its slot
        if self._starting.get(slot) is asyncio.current_task():
            del self._starting[slot]

    def _join(self, slot: int, replica: Deployment) -> None:
        if self._on_done is not None:
            replica.observe_requests(self._on_done)
        handle = self._make_handle(replica)
        self.ready[slot] = handle
        self.group.handles.append(handle)

    def _leave(self, handle: Handle) -> None:
        if handle in self.group.handles:
            self.group.handles.remove(handle)

    def _retire(self, handle: Handle) -> None:
        """Out of the group now; the requests it has get `drain_s`, then its actor is released."""
        self._leave(handle)
        log.info("%s: retiring %s (%d in flight)", self.name, handle.name, handle.stats.in_flight)

        async def retire() -> None:
            try:
                await handle.deployment.drain(self.drain_s)
            finally:
                await handle.deployment.aclose()

        task = asyncio.create_task(retire(), name=f"inferd-retire-{handle.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- autoscaling ----------------------------------------------------------------------------

    def load(self) -> Load:
        handles = list(self.ready.values())
        capacity = max((getattr(h.deployment, "capacity", 1) for h in handles), default=1)
        return Load(len(handles) + len(self._starting), sum(h.stats.in_flight for h in handles), capacity)

    async def _autoscale(self) -> None:
        while self.autoscaling and not self._stopped:
            await asyncio.sleep(self.interval_s)
            decision = self.autoscaler.decide(self.load())
            if decision.changes:
                self.last_decision = decision
                log.info("%s: autoscaling %d -> %d replicas: %s", self.name, decision.replicas,
                         decision.desired, decision.reason)
                self.target = decision.desired
                self._reconcile()
