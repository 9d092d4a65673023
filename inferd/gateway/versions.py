"""Model versions on a running server: load next to the old, move traffic, drain, roll back.

The `VersionManager` owns the gateway's versions. The store says what each group
serves (version_store.py); the manager makes this server serve it:

- **Loading first.** A version is started (its local engines loaded, its remote
  clients made) before any traffic is moved to it. A version that fails to load
  changes nothing: the versions serving go on serving, the failure is an event in
  the group's history, and the caller is told why.
- **Moving traffic.** A rollout is written to the store only once its versions are
  loaded here, then applied: the group's `Assignment` (canary.py) changes in one
  step, so every request routed afterwards sees the new one and none routed before
  is touched.
- **Draining.** A version no longer stable or canary (nor pinned by an open batch)
  takes no new requests; once nothing is in flight on it, it is unloaded. Streams
  that started on it finish on it.
- **Replicas.** Every `poll_s` the manager reads the rollouts; a group whose
  generation moved (a change made through another replica) is applied here the same
  way, so replicas on one PostgreSQL store converge on the same versions.
- **Automatic rollback.** On the same tick each canary is judged against its stable
  version (`canary.judge`); a canary that does worse by the group's margins is
  rolled back and the reason recorded.
- **Config reload.** `reload(config)` applies a new config: groups added, removed
  (drained), and changed (settings at once; changed deployments are a new stable
  version, loaded first like any deploy).

One lock serialises the changes this server makes; requests never take it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from inferd.engine.config import EngineConfig
from inferd.gateway import version_store as vs
from inferd.gateway.build import (apply_settings, make_group, start_all, version_deployments, version_handle,
                                  version_handles, version_pool, version_specs)
from inferd.gateway.canary import Assignment, VersionHealth, judge
from inferd.gateway.config import GatewayConfig, ModelGroupSpec, RaySpec, load_config, parse_deployments
from inferd.gateway.metrics import GatewayMetrics
from inferd.gateway.replicas import ReplicaPool
from inferd.gateway.router import Gateway, Handle, ModelGroup
from inferd.gateway.version_store import Rollout, Version, VersionError
from inferd.store.base import Store, Tx

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    """A version running on this server."""

    own: list[Handle]       # its deployments' handles
    specs: list             # its deployment specs under the names they serve as (for the price book)
    pools: list[ReplicaPool] = field(default_factory=list)  # its `provider: ray` deployments' replicas
    health: VersionHealth = field(default_factory=VersionHealth)  # shared by its handles, replicas joining later too
    retired_at: float | None = None   # when it stopped taking new requests

    @property
    def handles(self) -> list[Handle]:
        """Every handle of the version: its deployments' and its pools' replicas up now."""
        return [*self.own, *(h for p in self.pools for h in p.handles)]

    async def aclose(self) -> None:
        await asyncio.gather(*(h.deployment.aclose() for h in self.own), *(p.aclose() for p in self.pools),
                             return_exceptions=True)


class VersionManager:
    def __init__(self, gateway: Gateway, store: Store, config: GatewayConfig, base: EngineConfig, *,
                 max_waiting_requests: int | None = None, poll_s: float = 1.0,
                 clock: Callable[[], float] = time.time,
                 pinned: Callable[[Tx], set[tuple[str, str]]] | None = None):
        self.gateway, self.store, self.config, self.base = gateway, store, config, base
        self.max_waiting, self.poll_s, self.clock = max_waiting_requests, poll_s, clock
        self.pinned = pinned  # (group, label) pairs open batches hold: kept loaded
        self.on_loaded: Callable[[Handle], None] = lambda h: None
        self.on_change: Callable[[], None] = lambda: None
        self._rng = random.Random()
        self._lock = asyncio.Lock()
        self._loaded: dict[tuple[str, str], _Loaded] = {}
        self._generation: dict[str, int] = {}
        self._specs: dict[str, ModelGroupSpec] = {g.name: g for g in config.models}
        self._failed: dict[tuple[str, str], int] = {}  # a version that failed to load here, at a generation
        self._starting: dict[str, ModelGroup] = {}  # groups made at start, before the gateway has them
        self._task: asyncio.Task | None = None

    # ---- start and stop -----------------------------------------------------------------------

    @classmethod
    async def start(cls, config: GatewayConfig, base: EngineConfig, store: Store,
                    metrics: GatewayMetrics | None = None, **kw) -> VersionManager:
        """Load what the store says each config group serves (the config's deployments for a new or changed
        group); a stable version that fails to load fails the start, a canary only logs."""
        manager = cls(Gateway([], metrics=metrics), store, config, base, **kw)
        now = manager.clock()
        plan = await store.run(lambda tx: vs.config_plan(tx, config, now))
        wanted: dict[str, Rollout] = {}
        for g in config.models:
            current, v, changed = plan[g.name]
            wanted[g.name] = current if not changed else Rollout(g.name, v.label, generation=-1)
        try:
            groups = [await manager._start_group(g, wanted[g.name]) for g in config.models]
        except BaseException:
            await manager.aclose()
            raise
        manager.gateway.set_groups(groups)
        for g in config.models:  # write what changed, now that it runs
            current, v, changed = plan[g.name]
            if changed:
                try:
                    new = await manager._write(current or Rollout(g.name, v.label), action="config", stable=v.label,
                                               label=v.label, previous=current.stable if current else None,
                                               reason="the config's deployments", config_hash=v.spec_hash)
                except VersionError:  # another replica with the same config wrote it first: the loop applies it
                    continue
                manager._generation[g.name] = new.generation
        return manager

    async def _start_group(self, g: ModelGroupSpec, r: Rollout) -> ModelGroup:
        group = self._starting[g.name] = make_group(g, [], self._rng)  # replica pools join it as they load
        try:
            stable = await self._load(g.name, r.stable, r.generation)
            self._attach(group, stable)
            canary = None
            if r.canary is not None:
                try:
                    canary = await self._load(g.name, r.canary, r.generation)
                except VersionError as e:
                    log.error("%s", e.message)
                else:
                    self._attach(group, canary)
        finally:
            del self._starting[g.name]
        group.assignment = Assignment(r.stable, r.canary if canary else None, r.canary_percent)
        self._generation[g.name] = r.generation
        return group

    def run(self) -> None:
        """Start following the store (the poll loop)."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def aclose(self) -> None:
        """Stop the loop and close every loaded version."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        loaded, self._loaded = list(self._loaded.values()), {}
        self.gateway.pools.clear()
        await asyncio.gather(*(v.aclose() for v in loaded), return_exceptions=True)

    def handles(self) -> list[Handle]:
        """Every handle loaded, draining ones and those of groups removed by a reload included."""
        return [h for v in self._loaded.values() for h in v.handles]

    # ---- loading ----------------------------------------------------------------------------------

    async def _version(self, group: str, label: str) -> Version:
        v = await self.store.run(lambda tx: vs.version(tx, group, label))
        if v is None:
            raise VersionError(404, f"{group!r} has no version {label!r}", "label")
        return v

    async def _load(self, group: str, label: str, generation: int) -> _Loaded:
        """The version running here: loaded now if it is not yet; VersionError 422 saying why it failed."""
        loaded = self._loaded.get((group, label))
        if loaded is not None:
            loaded.retired_at = None
            return loaded
        v = await self._version(group, label)
        named = version_specs(group, label, list(v.specs))
        specs = [s for s in named if not isinstance(s, RaySpec)]
        loaded = _Loaded([], named)
        deployments = []
        try:
            deployments = version_deployments(group, label, named, self.base, self.max_waiting)
            pools = loaded.pools = self._pools(group, label, named, loaded)
            await start_all([*deployments, *pools])  # a pool starts and closes as a deployment does
        except Exception as e:  # noqa: BLE001 - whatever stops a version from loading is reported, not raised on
            await asyncio.gather(*(d.aclose() for d in deployments), *(p.aclose() for p in loaded.pools),
                                 return_exceptions=True)
            reason = str(e) or type(e).__name__
            log.error("%s@%s failed to load: %s", group, label, reason)
            self._failed[(group, label)] = generation
            now = self.clock()
            await self.store.run(lambda tx: vs.event(tx, group, "load_failed", now, label=label, reason=reason))
            raise VersionError(422, f"{group}@{label} failed to load: {reason}", "spec") from None
        loaded.own = version_handles(self._specs[group], label, specs, deployments, loaded.health)
        for h in loaded.own:
            self.on_loaded(h)
        self._loaded[(group, label)] = loaded
        for p in pools:
            self.gateway.pools[p.name] = p
        log.info("%s@%s loaded: %s", group, label, ", ".join(h.name for h in loaded.handles))
        return loaded

    def _pools(self, group: str, label: str, named: list, loaded: _Loaded) -> list[ReplicaPool]:
        """The replica pools of the version's `provider: ray` deployments (`named` by `version_specs`, so two
        versions' pools never share a name), not started; a replica joins with the version's health of the
        moment (a new canary resets it)."""
        g = self._specs[group]
        target = self._starting.get(group) or self.group(group)
        pools = []
        for j, spec in enumerate(named):
            if not isinstance(spec, RaySpec):
                continue

            def make_handle(dep, spec=spec):
                h = version_handle(g, label, spec, dep, loaded.health)
                self.on_loaded(h)
                return h

            pools.append(version_pool(spec, target, self.base, f"{group}@{label}.deployments[{j}]",
                                      self.max_waiting, make_handle))
        return pools

    # ---- applying a rollout ---------------------------------------------------------------------

    def group(self, name: str) -> ModelGroup:
        group = next((g for g in self.gateway.groups if g.name == name), None)
        if group is None:
            served = ", ".join(repr(g.name) for g in self.gateway.groups)
            raise VersionError(404, f"no model group is named {name!r}; this server serves {served}", "model")
        return group

    async def _apply(self, group: ModelGroup, r: Rollout) -> None:
        """Serve `r` in `group`: load what it needs (what fails keeps the versions serving), then switch."""
        stable = r.stable
        try:
            self._attach(group, await self._load(group.name, r.stable, r.generation))
        except VersionError:
            stable = group.assignment.stable  # the new stable did not load here: the old one goes on
        canary = r.canary
        if canary is not None:
            try:
                self._attach(group, await self._load(group.name, canary, r.generation))
            except VersionError:
                canary = None
        self._switch(group, Assignment(stable, canary, r.canary_percent))
        self._generation[group.name] = r.generation

    @staticmethod
    def _attach(group: ModelGroup, loaded: _Loaded) -> None:
        for h in loaded.handles:
            if h not in group.handles:
                group.handles.append(h)

    def _switch(self, group: ModelGroup, new: Assignment) -> None:
        old = group.assignment
        if new.canary != old.canary:  # a new canary is compared with the stable version from its start
            for label in new.serving:
                self._reset_health(group, label)
        group.assignment = new
        now = self.clock()
        for (name, label), loaded in self._loaded.items():
            if name == group.name and label not in new.serving and loaded.retired_at is None:
                loaded.retired_at = now
                log.info("%s@%s no longer takes new requests; it unloads when its last one ends", name, label)
        self.on_change()

    def _reset_health(self, group: ModelGroup, label: str) -> None:
        health = VersionHealth()
        loaded = self._loaded.get((group.name, label))
        if loaded is not None:
            loaded.health = health
        for h in group.handles:
            if h.version == label:
                h.health = health

    async def _write(self, current: Rollout, **change) -> Rollout:
        now = self.clock()
        return await self.store.run(lambda tx: vs.change(tx, current, now, **change))

    async def _current(self, group: str) -> Rollout:
        r = await self.store.run(lambda tx: vs.rollout(tx, group))
        if r is None:
            raise VersionError(404, f"{group!r} has no versions yet")
        return r

    # ---- the operations ---------------------------------------------------------------------------

    async def deploy(self, name: str, spec: object, *, label: str | None = None,
                     canary_percent: float | None = None) -> dict:
        """Make `spec` a version of the group (or find the version it already is), load it, and send it
        `canary_percent` of the keys, or all traffic when that is None or 100."""
        if canary_percent is not None and not 0 < canary_percent <= 100:
            raise VersionError(400, f"canary must be a percentage above 0 and at most 100, not {canary_percent}",
                               "canary")
        async with self._lock:
            group = self.group(name)
            try:
                specs = vs.with_prices(parse_deployments(spec, "spec"), self._specs[name].price)
            except ValueError as e:
                raise VersionError(400, str(e), "spec") from None
            now = self.clock()
            current, v = await self.store.run(
                lambda tx: (vs.rollout(tx, name), vs.ensure_version(tx, name, specs, now, label)))
            if current is None:
                raise VersionError(404, f"{name!r} has no versions yet")
            full = canary_percent is None or canary_percent >= 100
            if v.label == current.stable:
                raise VersionError(409, f"{name}@{v.label} is already the stable version", "spec")
            await self._load(name, v.label, current.generation)
            if full:
                new = await self._write(current, action="deploy", stable=v.label, label=v.label,
                                        previous=current.stable)
            else:
                new = await self._write(current, action="deploy", stable=current.stable, canary=v.label,
                                        canary_percent=canary_percent, label=v.label)
            await self._apply(group, new)
            return self.describe_one(group, new)

    async def promote(self, name: str) -> dict:
        """The canary becomes the stable version; the old stable drains."""
        async with self._lock:
            group = self.group(name)
            current = await self._current(name)
            if current.canary is None:
                raise VersionError(409, f"{name!r} has no canary to promote")
            await self._load(name, current.canary, current.generation)
            new = await self._write(current, action="promote", stable=current.canary, label=current.canary,
                                    previous=current.stable)
            await self._apply(group, new)
            return self.describe_one(group, new)

    async def rollback(self, name: str, reason: str | None = None, *, action: str = "rollback",
                       canary: str | None = None) -> dict:
        """Take the canary out; with none, return to the version that was stable before this one."""
        async with self._lock:
            group = self.group(name)
            current = await self._current(name)
            if canary is not None and current.canary != canary:
                return self.describe_one(group, current)  # judged on a canary that is gone already
            if current.canary is not None:
                new = await self._write(current, action=action, stable=current.stable, label=current.canary,
                                        reason=reason)
            else:
                target = await self.store.run(lambda tx: vs.previous_stable(tx, name, current.stable))
                if target is None:
                    raise VersionError(409, f"{name!r} has no canary and no earlier stable version to roll back to")
                await self._load(name, target, current.generation)
                new = await self._write(current, action=action, stable=target, label=target,
                                        previous=current.stable, reason=reason)
            await self._apply(group, new)
            return self.describe_one(group, new)

    # ---- following the store ----------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - a store hiccup must not end the following
                log.exception("following the model versions failed")

    async def tick(self) -> None:
        """Apply what changed elsewhere, judge the canaries, unload what has drained."""
        keep = await self.store.run(self.pinned) if self.pinned is not None else set()
        async with self._lock:
            # read under the lock: rollouts read before a change this server makes, then applied after it,
            # would put the group back to what it served before the change
            found = await self.store.run(vs.rollouts)
            for group in list(self.gateway.groups):
                r = found.get(group.name)
                if r is not None and r.generation != self._generation.get(group.name):
                    await self._apply(group, r)
        for group in list(self.gateway.groups):
            await self._judge(group)
        async with self._lock:
            await self._unload_drained(keep)

    async def _judge(self, group: ModelGroup) -> None:
        a = group.assignment
        if a.canary is None:
            return
        canary = next((h.health for h in group.handles if h.version == a.canary), None)
        stable = next((h.health for h in group.handles if h.version == a.stable), None)
        if canary is None or stable is None:
            return
        verdict = judge(canary, stable, group.canary_policy)
        if verdict is not None:
            log.warning("%s@%s rolled back automatically: %s", group.name, a.canary, verdict)
            try:
                await self.rollback(group.name, verdict, action="auto_rollback", canary=a.canary)
            except VersionError as e:  # another replica got there first
                log.info("automatic rollback of %s@%s: %s", group.name, a.canary, e.message)

    async def _unload_drained(self, keep: set[tuple[str, str]]) -> None:
        now = self.clock()
        for key, loaded in list(self._loaded.items()):
            if loaded.retired_at is None or key in keep or now - loaded.retired_at < self.poll_s:
                continue
            if any(h.stats.in_flight for h in loaded.handles):
                continue
            del self._loaded[key]
            group = next((g for g in self.gateway.groups if g.name == key[0]), None)
            if group is not None:
                group.handles[:] = [h for h in group.handles if h not in loaded.handles]
            for p in loaded.pools:
                self.gateway.pools.pop(p.name, None)
            await loaded.aclose()
            log.info("%s@%s drained and unloaded", *key)
            self.on_change()

    # ---- config reload ----------------------------------------------------------------------------

    async def reload(self, config: GatewayConfig) -> dict:
        """Serve `config` from now on: new groups start, removed ones drain, changed ones change (module
        docstring). A group whose new deployments fail to load keeps what it served; the answer says so."""
        async with self._lock:
            now = self.clock()
            plan = await self.store.run(lambda tx: vs.config_plan(tx, config, now))
            old = {g.name: g for g in self.gateway.groups}
            groups, report = [], {"added": [], "changed": [], "removed": [], "failed": {}}
            for g in config.models:
                current, v, changed = plan[g.name]
                self._specs[g.name] = g
                group = old.get(g.name)
                try:
                    if group is None:
                        group = await self._start_group(g, current if not changed else Rollout(g.name, v.label))
                        report["added"].append(g.name)
                    else:
                        if changed or g != self._old_spec(g.name):
                            report["changed"].append(g.name)
                        apply_settings(group, g, self._rng)
                    if changed:
                        await self._load(g.name, v.label, current.generation if current else 0)
                        new = await self._write(current or Rollout(g.name, v.label), action="config",
                                                stable=v.label, label=v.label,
                                                previous=current.stable if current else None,
                                                reason="the config's deployments", config_hash=v.spec_hash)
                        await self._apply(group, new)
                except VersionError as e:
                    report["failed"][g.name] = e.message
                    if g.name not in old:
                        continue
                groups.append(group)
            for name in old:
                if name not in plan:  # no longer reachable by name; what runs on it finishes, then it unloads
                    report["removed"].append(name)
                    for (group_name, _), loaded in self._loaded.items():
                        if group_name == name and loaded.retired_at is None:
                            loaded.retired_at = now
            self.gateway.set_groups(groups)
            self.config = config
            self.on_change()
            return report

    async def reload_file(self, path: str) -> dict:
        """Read the config file again and serve it; ValueError (nothing changed) when it is invalid."""
        report = await self.reload(load_config(path))
        log.info("config %s reloaded: %s", path, report)
        return report

    def _old_spec(self, name: str) -> ModelGroupSpec | None:
        return next((g for g in self.config.models if g.name == name), None)

    # ---- what is served -----------------------------------------------------------------------------

    def effective_config(self) -> GatewayConfig:
        """The config with each group's deployments replaced by those of its loaded versions (draining ones
        too, so their last requests are priced): what the price book is built from."""
        by_group: dict[str, list] = {}
        for (name, _), loaded in self._loaded.items():
            by_group.setdefault(name, []).extend(loaded.specs)
        # links to groups not running (removed by a reload, or whose start failed) are left out
        running = {n for name in by_group for n in (name, *self._specs[name].aliases)}
        models = []
        for name, deployments in by_group.items():
            spec = self._specs[name]
            fallbacks = {cls: [t for t in chain if t in running] for cls, chain in spec.fallbacks.items()}
            degrade_to = spec.degrade_to if spec.degrade_to in running else None
            models.append(spec.model_copy(update={"deployments": deployments, "fallbacks": fallbacks,
                                                  "degrade_to": degrade_to}))
        return GatewayConfig.model_construct(models=models)

    def describe_one(self, group: ModelGroup, r: Rollout | None = None) -> dict:
        a = group.assignment
        out = {"model": group.name, "stable": a.stable, "canary": a.canary,
               "canary_percent": a.canary_percent if a.canary else 0.0,
               "generation": self._generation.get(group.name) if r is None else r.generation, "loaded": []}
        for (name, label), loaded in sorted(self._loaded.items()):
            if name != group.name:
                continue
            health = loaded.health
            out["loaded"].append({"label": label, "deployments": [h.name for h in loaded.handles],
                                  "draining": loaded.retired_at is not None,
                                  "in_flight": sum(h.stats.in_flight for h in loaded.handles),
                                  "health": health.to_dict()})
        return out

    async def describe(self, name: str | None = None) -> list[dict]:
        """Every group (or one): what it serves here, and its versions in the store."""
        groups = [self.group(name)] if name is not None else list(self.gateway.groups)
        stored = await self.store.run(lambda tx: {g.name: vs.versions(tx, g.name) for g in groups})
        out = []
        for g in groups:
            card = self.describe_one(g)
            card["versions"] = [{"label": v.label, "hash": v.spec_hash, "created": v.created,
                                 "spec": v.to_dict()["spec"]} for v in stored[g.name]]
            out.append(card)
        return out

    async def history(self, name: str, limit: int = 100) -> list[dict]:
        self.group(name)
        return await self.store.run(lambda tx: vs.history(tx, name, limit))

