"""`RayReplica`: one engine replica on a Ray actor, as a gateway deployment, restarted when it dies.

It is a `LocalEngineDeployment` (providers/local.py) whose engine core's host is
a Ray actor (providers/ray_actor.py): requests, streaming, errors and every
answer the server asks of a deployment are the local engine's, unchanged.

What it adds is supervision. When the core dies (its actor's process killed, its
node lost, a fatal step), the `AsyncEngine` fails every request in flight with
`EngineDeadError`, which the gateway turns into a retry on another replica for
requests that had not streamed anything yet and into a continuation (or an error
event) for streams that had started (docs/gateway.md); the replica turns
unhealthy, so routing skips it. Meanwhile the replica's supervisor releases what
is left of the dead actor and starts a new one, which Ray places wherever the
resources are, with backoff while that fails; once its model is loaded the new
engine takes over under the same deployment name. While it is coming back the
replica is `recovering`: the server stays healthy, the other replicas answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from inferd.engine.client.async_client import AsyncEngine, RequestMetrics
from inferd.engine.config import EngineConfig
from inferd.providers.local import LocalEngineDeployment
from inferd.providers.ray_actor import RayActorHost

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 30.0)  # first and longest wait between failed restarts


class RayReplica(LocalEngineDeployment):
    """A replica of a `provider: ray` deployment: `new_host()` gives the host of each incarnation."""

    def __init__(self, name: str, model_name: str, config: EngineConfig, new_host: Callable[[], RayActorHost], *,
                 max_waiting_requests: int = 256, start_timeout_s: float = 600.0):
        self._host = new_host()
        super().__init__(name, model_name, config, max_waiting_requests=max_waiting_requests, host=self._host)
        self._new_host = new_host
        self._start_timeout_s = start_timeout_s
        self._on_done: Callable[[RequestMetrics], None] | None = None
        self._supervisor: asyncio.Task | None = None
        self._closing = False
        self.restarts = 0
        self.last_death: str | None = None
        self._where: dict | None = None

    async def start(self) -> None:
        await self.engine.start(self._start_timeout_s)
        self._where = await self._host.where()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"inferd-supervise-{self.name}")

    def observe_requests(self, on_done: Callable[[RequestMetrics], None]) -> None:
        self._on_done = on_done
        super().observe_requests(on_done)

    @property
    def recovering(self) -> bool:
        return not self._closing and self._supervisor is not None and not self.engine.is_healthy

    def placement(self) -> dict:
        return {"backend": "ray", **(self._where or {}), "restarts": self.restarts, "last_death": self.last_death}

    async def _supervise(self) -> None:
        while True:
            reason = await self.engine.wait_dead()
            if self._closing:
                return
            self.last_death = reason
            log.warning("%s: the engine is gone (%s); starting a new Ray actor for it", self.name, reason)
            dead = self.engine
            await dead.shutdown()  # the sockets, and the actor if anything is left of it
            self.engine, self._host = await self._restarted(dead)
            self.restarts += 1
            self._where = await self._host.where()
            log.info("%s: restarted on %s (restart %d)", self.name, (self._where or {}).get("node_ip", "?"),
                     self.restarts)

    async def _restarted(self, dead: AsyncEngine) -> tuple[AsyncEngine, RayActorHost]:
        """A new engine on a new actor, once one came up; tries again with backoff until then."""
        delay, longest = RESTART_BACKOFF_S
        while True:
            host = self._new_host()
            engine = AsyncEngine(dead.config, max_waiting_requests=dead.max_waiting_requests,
                                 on_request_done=self._on_done, host=host)
            started = time.monotonic()
            try:
                await engine.start(self._start_timeout_s)
                return engine, host
            except Exception as e:  # noqa: BLE001 - no resources yet, a node going away: try again
                log.error("%s: restart failed after %.1fs: %s; trying again in %.0fs", self.name,
                          time.monotonic() - started, e, delay)
            await asyncio.sleep(delay)
            delay = min(longest, delay * 2)

    async def drain(self, timeout: float) -> None:
        self._closing = True
        await super().drain(timeout)

    async def aclose(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await super().aclose()
