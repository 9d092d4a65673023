"""GET /v1/deployments: every deployment of every model group, with its price and live load, as JSON.

What a person choosing or watching models needs and /v1/models does not say: which
deployments a group has, which endpoints they serve, local or remote, whether they
are healthy, requests in flight, the price book's prices (USD per million tokens, so
a client can price the usage it was given by the deployment named in the
`x-inferd-deployment` header), and for local engines the scheduler's gauges (running,
waiting, KV cache use) and token totals since start (their rate over two reads is the
engine's throughput), and for Ray replicas where they run (`placement`: node, pid,
restarts). It is /metrics' engine gauges in a shape a browser reads; any
key may call it (prices and load are not per team).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from inferd.api.protocol import ServerState, json_response, state
from inferd.engine.messages import Stats
from inferd.gateway.router import Handle, ModelGroup

router = APIRouter()


def _engine(st: ServerState, h: Handle) -> dict | None:
    stats = h.deployment.stats()
    if not isinstance(stats, Stats):  # remote, embedding and tensor deployments have no scheduler
        return None
    labels = {"model_name": h.deployment.info.id}
    # counters advance as requests finish (api/metrics.py), so totals lag a running request, never drift
    prompt = st.registry.get_sample_value("inferd:prompt_tokens_total", labels) or 0.0
    generated = st.registry.get_sample_value("inferd:generation_tokens_total", labels) or 0.0
    return {"running": stats.running, "waiting": stats.waiting, "kv_cache_usage": stats.kv_usage,
            "kv_free_blocks": stats.num_free_blocks, "kv_total_blocks": stats.num_blocks,
            "preemptions": stats.num_preemptions, "prefix_cache_queries": stats.prefix_cache_queries,
            "prefix_cache_hits": stats.prefix_cache_hits,
            "prompt_tokens_total": int(prompt), "generation_tokens_total": int(generated)}


def _card(st: ServerState, group: ModelGroup, h: Handle) -> dict:
    price = st.metering.prices.price(h.name)
    return {"id": h.name, "object": "deployment", "model": group.name, "version": h.version,
            "kind": "local" if h.deployment.info is not None else "remote",
            "endpoints": sorted(h.deployment.endpoints), "healthy": h.deployment.healthy,
            "in_flight": h.stats.in_flight,
            "price": {"input": price.input, "cached_input": price.cached_input, "output": price.output,
                      "batch_discount": price.batch_discount, "per_1k_predictions": price.per_1k_predictions},
            "engine": _engine(st, h), "placement": h.deployment.placement()}


@router.get("/v1/deployments")
async def list_deployments(request: Request):
    st = state(request)
    data = [_card(st, g, h) for g in st.gateway.groups for h in g.handles]
    return json_response({"object": "list", "time": st.metering.clock(), "data": data})
