"""From a validated `GatewayConfig` to a running `Gateway`: deployments made and started.

Local engines start concurrently (each loads its model in its own process); if
any fails to start, the ones already started are stopped and the error says which
deployment failed, so a config starts whole or not at all. Remote deployments
need their API key's environment variable set when the config names one. A
`provider: ray` deployment becomes a `ReplicaPool` (gateway/replicas.py) whose
replicas join its group as they come up; this process joins the Ray cluster first.
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
from inferd.gateway.config import (AnthropicSpec, GatewayConfig, LocalSpec, ModelGroupSpec, OnnxSpec, OpenAISpec,
                                   PriceSpec, RaySpec, local_embed_config, local_engine_config, replica_name)
from inferd.gateway.metrics import GatewayMetrics
from inferd.gateway.replicas import ReplicaPool
from inferd.gateway.router import Gateway, Handle, ModelGroup
from inferd.gateway.stats import DeploymentStats, LoadPredictor
from inferd.gateway.strategies import make_strategy
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


def _handle(g: ModelGroupSpec, spec, dep: Deployment) -> Handle:
    """A started deployment as a member of group `g`."""
    capacity = getattr(dep, "capacity", None)
    predictor = LoadPredictor(capacity) if capacity else None
    breaker = CircuitBreaker(g.circuit_breaker.failure_threshold, g.circuit_breaker.cooldown_s)
    return Handle(dep, weight=spec.weight, cost_per_mtok=_cost_per_mtok(spec.price or g.price),
                  stats=DeploymentStats(predictor=predictor), breaker=breaker)


def _empty_group(g: ModelGroupSpec, rng: random.Random) -> ModelGroup:
    return ModelGroup(name=g.name, handles=[], strategy=make_strategy(g.routing, rng), aliases=g.aliases,
                      fallbacks=dict(g.fallbacks), degrade_to=g.degrade_to,
                      slo_ttft_s=g.slo_ttft_ms / 1000 if g.slo_ttft_ms else None,
                      retry=RetryPolicy(**g.retry.model_dump()))


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


def _pool(spec: RaySpec, g: ModelGroupSpec, group: ModelGroup, make_replica) -> ReplicaPool:
    a = spec.autoscale
    autoscaler = Autoscaler(spec.min_replicas, spec.max_replicas, a.target_queue, a.upscale_delay_s,
                            a.downscale_delay_s)
    return ReplicaPool(spec.name, group, make_replica, lambda dep: _handle(g, spec, dep), replicas=spec.replicas,
                       autoscaler=autoscaler, interval_s=a.interval_s)


async def start_gateway(config: GatewayConfig, base: EngineConfig, metrics: GatewayMetrics | None = None, *,
                        max_waiting_requests: int | None = None) -> Gateway:
    """Make every deployment, start the local ones and the Ray replicas, and wire up the groups."""
    rng = random.Random()
    groups = [_empty_group(g, rng) for g in config.models]
    made: list[list[tuple[object, Deployment]]] = []
    pools: list[ReplicaPool] = []
    for i, (g, group) in enumerate(zip(config.models, groups)):
        mine = []
        for j, d in enumerate(g.deployments):
            where = f"models[{i}].deployments[{j}]"
            if isinstance(d, RaySpec):
                pools.append(_pool(d, g, group, _replica_maker(d, g.name, base, where, max_waiting_requests)))
            else:
                mine.append((d, _make_deployment(d, g.name, base, where, max_waiting_requests)))
        made.append(mine)
    everything = [d for ds in made for _, d in ds]
    results = await asyncio.gather(*(d.start() for d in everything), *(p.start() for p in pools),
                                   return_exceptions=True)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        await asyncio.gather(*(d.aclose() for d in everything), *(p.aclose() for p in pools),
                             return_exceptions=True)
        raise failed
    for g, group, mine in zip(config.models, groups, made):
        group.handles[:0] = [_handle(g, spec, d) for spec, d in mine]
    return Gateway(groups, metrics=metrics, pools=pools)
