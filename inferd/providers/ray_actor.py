"""Engine cores on a Ray cluster: the actor a core runs in, and the link host that places it.

An engine core is a child of the API process (engine/process_link.py). Here its
host is a Ray actor instead of a local process: `RayActorHost.start` asks Ray for
an actor with the replica's resources (`num_cpus`, `num_gpus`, custom ones), Ray
starts it on whichever node has them, and the actor runs the core's ordinary
entry point (`engine/core/process.py:run_core`) in its worker process. The link's
sockets are TCP sockets bound on this server's address (`bind_host`); the core
connects to them as it connects to ipc files locally, so requests go to it and
token deltas come back over one socket each way, straight between the two
processes: no Ray call, object store or proxy sits on the token path.

Ray does the rest of what a process sentinel does locally: the `run` call on the
actor returns when the core's loop ends and raises when the actor dies (its
process killed, its node lost), which is how the link learns of a dead core; and
an actor whose owner (this server) dies is ended by Ray, so a core never outlives
its server. Actors are made with `max_restarts=0`: a dead core is replaced by a
new actor that the server starts and links to itself (providers/ray_replica.py),
since a core restarted behind the server's back would have no link to talk on.

Ray is optional (`pip install 'inferd[ray]'`); it is imported only here, when a
`provider: ray` deployment starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

RAY_MISSING = "provider: ray needs Ray; install it with pip install 'inferd[ray]'"


def import_ray():
    """The `ray` module; ValueError (a config error) where it is not installed."""
    try:
        import ray
    except ImportError:
        raise ValueError(RAY_MISSING) from None
    return ray


_joined: list[str | None] = []  # the address this process joined the cluster with, once it has


def connect(address: str | None):
    """Join the Ray cluster at `address` ("auto", "host:port"; None: start one on this machine), once
    per process; returns the `ray` module. A later deployment (a new model version) naming another
    address is refused: one process is a node of one cluster."""
    ray = import_ray()
    if not ray.is_initialized():
        # Ray's own log lines stay quiet; the cores' logs still reach this process's output
        ray.init(address=address, namespace="inferd", logging_level=logging.WARNING,
                 **({} if address else {"include_dashboard": False}))
        _joined[:] = [address]
    elif _joined and _joined[0] != address:
        raise ValueError(f"address: {address!r} is not the Ray cluster this server joined ({_joined[0]!r}); "
                         "every provider: ray deployment of a server must name the same address")
    return ray


def this_node_address() -> str:
    """The address Ray knows this node by: reachable from every other node of the cluster."""
    return import_ray().util.get_node_ip_address()


class ChildActor:
    """A Ray actor that runs one child's entry point (an engine core's loop) in its worker process."""

    def where(self) -> dict:
        import ray
        return {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid()}

    def run(self, target: Callable, args: tuple) -> None:
        config, to_child, from_child, log_level = args
        # no parent pid: this process is Ray's worker, and Ray ends it when the server goes
        target(config, to_child, from_child, None, log_level)


_REMOTE: dict[str, type] = {}


def _remote_class():
    if "actor" not in _REMOTE:  # made once: each ray.remote() call would register the class again
        _REMOTE["actor"] = import_ray().remote(ChildActor)
    return _REMOTE["actor"]


@dataclass(frozen=True)
class ActorResources:
    """What Ray reserves for one replica on its node."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)


class RayActorHost:
    """A `ChildHost` (engine/process_link.py) that runs the child in a new Ray actor; one per start."""

    def __init__(self, resources: ActorResources, bind_host: str):
        self.resources, self.bind_host = resources, bind_host
        self.actor = None
        self._where = None
        self._watch: asyncio.Task | None = None

    def start(self, target: Callable, args: tuple, name: str, on_exit: Callable[[str], None]) -> None:
        r = self.resources
        options = dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_restarts=0)
        if r.resources:
            options["resources"] = dict(r.resources)
        self.actor = _remote_class().options(**options).remote()
        # calls on one actor run in the order sent: `where` answers before the core's loop starts
        self._where = self.actor.where.remote()
        run = self.actor.run.remote(target, args)
        self._watch = asyncio.ensure_future(self._watch_run(run, on_exit))

    async def _watch_run(self, run, on_exit: Callable[[str], None]) -> None:
        ray = import_ray()
        try:
            await run
            status = "its actor's loop returned"
        except asyncio.CancelledError:
            raise
        except ray.exceptions.RayActorError as e:
            status = f"its Ray actor died: {_first_line(e)}"
        except Exception as e:  # noqa: BLE001 - any way the call ends is the end of the child
            status = f"its Ray actor failed: {type(e).__name__}: {_first_line(e)}"
        on_exit(status)

    async def where(self) -> dict | None:
        """The node and process the actor runs in (None: not known, it never came up)."""
        if self._where is None:
            return None
        try:
            return await self._where
        except Exception:  # noqa: BLE001 - a dead actor has no place
            return None

    def terminate(self) -> None:
        self.kill()

    def kill(self) -> None:
        if self.actor is not None:
            import_ray().kill(self.actor, no_restart=True)

    def release(self) -> None:
        """The actor is killed, so that its resources go back to the cluster (its loop has ended, or
        it is dead already; killing a dead actor does nothing)."""
        self.kill()
        self.actor = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
