"""The admin API for Ray replicas: how many a `provider: ray` deployment has, and how many it should.

`GET /admin/replicas` lists every Ray deployment's pool (gateway/replicas.py):
the count wanted, the autoscaler's bounds and last decision, and each replica
with its health, load and placement. `GET /admin/replicas/{deployment}` is one of
them. `PUT /admin/replicas/{deployment}` with any of `replicas`, `min_replicas`,
`max_replicas` moves the count and the bounds at run time: it answers 202 with
the pool as it is now, and the replicas start or retire in the background (a
new one joins its group once its model is loaded), so the response's `ready`
counts up as they do. Bounds that disagree (`replicas` outside them) are a 400
and change nothing. With `min_replicas < max_replicas` the autoscaler moves the
count within the bounds from then on. The middleware has already refused
non-admin keys.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from inferd.api.protocol import json_response, read_model, state
from inferd.gateway.config import MAX_REPLICAS
from inferd.wire.errors import http_error

router = APIRouter()


class ReplicasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS)
    min_replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS)
    max_replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS)


@router.get("/admin/replicas")
async def list_pools(request: Request):
    pools = state(request).gateway.pools.values()
    return json_response({"object": "list", "data": [p.status() for p in pools]})


@router.get("/admin/replicas/{name:path}")
async def get_pool(request: Request, name: str):
    return json_response(state(request).gateway.pool(name).status())


@router.put("/admin/replicas/{name:path}")
async def set_replicas(request: Request, name: str):
    body = await read_model(request, ReplicasBody)
    pool = state(request).gateway.pool(name)
    if body.replicas is None and body.min_replicas is None and body.max_replicas is None:
        raise http_error(400, "give replicas, min_replicas or max_replicas", param="replicas")
    try:
        pool.set_target(body.replicas, body.min_replicas, body.max_replicas)
    except ValueError as e:
        raise http_error(400, str(e), param="replicas") from None
    return json_response(pool.status(), status=202)
