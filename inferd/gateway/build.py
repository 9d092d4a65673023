"""From specs to running parts of a `Gateway`: deployments made and started, handles, groups.

A model version's deployments start concurrently (local engines each load their
model in their own process); if any fails to start, the ones already started are
stopped and the error says which deployment failed, so a version starts whole or
not at all. Remote deployments need their API key's environment variable set when
the spec names one. gateway/versions.py decides which versions to start.
A `provider: ray` deployment of a version becomes a `ReplicaPool` (gateway/replicas.py)
whose replicas join its group as they come up; this process joins the Ray cluster first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
from collections.abc import Callable

from inferd.engine.config import EngineConfig
from inferd.gateway.backoff import RetryPolicy
from inferd.gateway.circuit_breaker import CircuitBreaker
from inferd.gateway.autoscale import Autoscaler
from inferd.gateway.canary import VersionHealth
from inferd.gateway.config import (AnthropicSpec, LocalSpec, ModelGroupSpec, OnnxSpec, OpenAISpec, PriceSpec, RaySpec,
                                   local_embed_config, local_engine_config, replica_name)
from inferd.gateway.replicas import ReplicaPool
from inferd.gateway.router import Handle, ModelGroup
from inferd.gateway.stats import DeploymentStats, LoadPredictor
from inferd.gateway.strategies import make_strategy
from inferd.gateway.version_store import deployment_name
from inferd.providers.base import Deployment, Timeouts

log = logging.getLogger(__name__)


def _make_deployment(spec, group: str, base: EngineConfig, where: str, max_waiting: int | None) -> Deployment:
    """One deployment; a local one answers under its group's name."""
    if isinstance(spec, LocalSpec):
        waiting = spec.max_waiting_requests if max_waiting is None else max_waiting
        if spec.task == "embed":
            from inferd.providers.local_embeddings import LocalEmbeddingDeployment
            return LocalEmbeddingDeployment(spec.name, group, local_embed_config(spec, base, where))
        config = local_engine_config(spec, base, where)
        from inferd.providers.local import LocalEngineDeployment
        return LocalEngineDeployment(spec.name, group, config, max_waiting_requests=waiting)
    if isinstance(spec, OnnxSpec):
        from inferd.providers.onnx import OnnxDeployment
        return OnnxDeployment(spec.name, group, spec.model, version=spec.version, max_batch_size=spec.max_batch_size,
                              max_queue_delay_s=spec.max_queue_delay_microseconds / 1e6,
                              intra_op_num_threads=spec.intra_op_num_threads)
    if spec.api_key_env and spec.api_key() is None:
        raise ValueError(f"{where}.api_key_env: the environment variable {spec.api_key_env} is not set")
    timeouts = Timeouts(**spec.timeouts.model_dump())
    common = dict(name=spec.name, base_url=spec.base_url, api_key=spec.api_key(), model=spec.model,
                  timeouts=timeouts, headers=spec.headers)
    if isinstance(spec, OpenAISpec):
        from inferd.providers.openai_compat import OpenAICompatConfig, OpenAICompatDeployment
        return OpenAICompatDeployment(OpenAICompatConfig(**common, prefill=spec.prefill))
    assert isinstance(spec, AnthropicSpec)
    from inferd.providers.anthropic import AnthropicConfig, AnthropicDeployment
    return AnthropicDeployment(AnthropicConfig(**common, anthropic_version=spec.version))


def _cost_per_mtok(price: PriceSpec | None) -> float | None:
    # one number to rank by: a typical request reads more than it writes (3:1)
    if price is None:
        return None
    inp, _, out = price.per_million()
    return (3 * inp + out) / 4


def version_specs(group: str, label: str, specs: list) -> list:
    """A version's specs under the names its deployments serve as, so that versions can run side by side
    (named over the whole list: an unnamed spec's name is its index among all of the version's)."""
    return [spec.model_copy(update={"name": deployment_name(group, label, spec, j)}) for j, spec in enumerate(specs)]


def version_deployments(group: str, label: str, named: list, base: EngineConfig, max_waiting: int | None
                        ) -> list[Deployment]:
    """The deployments of a version's specs (`version_specs`) but its `provider: ray` ones (`version_pool`)."""
    return [_make_deployment(spec, group, base, f"{group}@{label}.deployments[{j}]", max_waiting)
            for j, spec in enumerate(named) if not isinstance(spec, RaySpec)]


async def start_all(deployments: list[Deployment]) -> None:
    """Start them concurrently; if any fails, stop them all and raise its error."""
    results = await asyncio.gather(*(d.start() for d in deployments), return_exceptions=True)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        await asyncio.gather(*(d.aclose() for d in deployments), return_exceptions=True)
        raise failed


def version_handle(g: ModelGroupSpec, label: str | None, spec, dep: Deployment,
                   health: VersionHealth | None) -> Handle:
    """A started deployment of version `label` of group `g` as a routing handle (sharing its version's health)."""
    capacity = getattr(dep, "capacity", None)
    predictor = LoadPredictor(capacity) if capacity else None
    breaker = CircuitBreaker(g.circuit_breaker.failure_threshold, g.circuit_breaker.cooldown_s)
    return Handle(dep, weight=spec.weight, cost_per_mtok=_cost_per_mtok(spec.price or g.price),
                  stats=DeploymentStats(predictor=predictor), breaker=breaker, version=label,
                  health=health if label is not None else None)


def version_handles(g: ModelGroupSpec, label: str | None, specs: list, deployments: list[Deployment],
                    health: VersionHealth | None = None) -> list[Handle]:
    """Routing handles of one version's deployments; they share the version's health."""
    health = health or VersionHealth()
    return [version_handle(g, label, spec, dep, health) for spec, dep in zip(specs, deployments)]


def apply_settings(group: ModelGroup, g: ModelGroupSpec, rng: random.Random) -> None:
    """Give a group the settings of its spec (routing, aliases, fallbacks, SLO, retries, canary policy)."""
    group.strategy = make_strategy(g.routing, rng)
    group.aliases, group.fallbacks, group.degrade_to = list(g.aliases), dict(g.fallbacks), g.degrade_to
    group.slo_ttft_s = g.slo_ttft_ms / 1000 if g.slo_ttft_ms else None
    group.retry = RetryPolicy(**g.retry.model_dump())
    group.canary_policy = g.canary


def make_group(g: ModelGroupSpec, handles: list[Handle], rng: random.Random) -> ModelGroup:
    group = ModelGroup(name=g.name, handles=handles, strategy=make_strategy(g.routing, rng))
    apply_settings(group, g, rng)
    return group


def _replica_maker(spec: RaySpec, group: str, base: EngineConfig, where: str,
                   max_waiting: int | None) -> Callable[[int], Deployment]:
    """What makes replica `slot` of a Ray deployment (joining the Ray cluster first)."""
    from inferd.providers.ray_actor import ActorResources, RayActorHost, connect, this_node_address
    from inferd.providers.ray_replica import RayReplica

    config = local_engine_config(spec, base, where)
    if "num_threads" not in spec.engine:  # the cores Ray reserved for it, not the whole node's
        config = dataclasses.replace(config, num_threads=max(1, math.floor(spec.num_cpus)))
    connect(spec.address)
    resources = ActorResources(spec.num_cpus, spec.num_gpus, dict(spec.resources))
    bind_host = spec.link_host or this_node_address()
    waiting = spec.max_waiting_requests if max_waiting is None else max_waiting
    return lambda slot: RayReplica(replica_name(spec.name, slot), group, config,
                                   lambda: RayActorHost(resources, bind_host), max_waiting_requests=waiting,
                                   start_timeout_s=spec.start_timeout_s)


def version_pool(spec: RaySpec, group: ModelGroup, base: EngineConfig, where: str, max_waiting: int | None,
                 make_handle: Callable[[Deployment], Handle]) -> ReplicaPool:
    """The replica pool of one `provider: ray` deployment of a version (not started)."""
    a = spec.autoscale
    autoscaler = Autoscaler(spec.min_replicas, spec.max_replicas, a.target_queue, a.upscale_delay_s,
                            a.downscale_delay_s)
    return ReplicaPool(spec.name, group, _replica_maker(spec, group.name, base, where, max_waiting), make_handle,
                       replicas=spec.replicas, autoscaler=autoscaler, interval_s=a.interval_s)
