"""The Batch API: create a batch from an uploaded file, get it, list them (newest first, `after`/`limit`),
cancel it. The server's batch runner (batch/runner.py) does the work."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from inferd.api.protocol import json_response, read_model, state
from inferd.api.routes_files import owner
from inferd.batch import jobs as batches
from inferd.batch.files import batch_endpoint, batch_urls
from inferd.wire.errors import InferdError, http_error

router = APIRouter()


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def _error(e: batches.BatchError) -> InferdError:
    return http_error(e.status, e.message, param=e.param)


@router.post("/v1/batches")
async def create(request: Request):
    body = await read_model(request, CreateBatch)
    if batch_endpoint(body.endpoint) is None:
        raise http_error(400, f"endpoint must be one of {batch_urls()}", param="endpoint")
    team, key_id, admin = owner(request)
    st = state(request)
    now = st.metering.clock()
    try:
        batch = await st.metering.store.run(lambda tx: batches.create_batch(
            tx, team=team, key_id=key_id, admin=admin, input_file_id=body.input_file_id, endpoint=body.endpoint,
            completion_window=body.completion_window, metadata=body.metadata, now=now))
    except batches.BatchError as e:
        raise _error(e) from None
    st.batch_runner.wake()
    return json_response(batch.to_dict())


@router.get("/v1/batches")
async def list_batches(request: Request, after: str | None = None, limit: int = 20):
    team, _, admin = owner(request)
    limit = max(1, min(limit, 100))
    try:
        rows, more = await state(request).metering.store.run(
            lambda tx: batches.list_batches(tx, team, admin, after, limit))
    except batches.BatchError as e:
        raise _error(e) from None
    data = [b.to_dict() for b in rows]
    return json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                          "last_id": data[-1]["id"] if data else None, "has_more": more})


@router.get("/v1/batches/{batch_id}")
async def get(request: Request, batch_id: str):
    team, _, admin = owner(request)
    batch = await state(request).metering.store.run(lambda tx: batches.get_batch(tx, batch_id, team, admin))
    if batch is None:
        raise http_error(404, f"no batch has the id {batch_id!r}", param="batch_id")
    return json_response(batch.to_dict())


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel(request: Request, batch_id: str):
    team, _, admin = owner(request)
    now = state(request).metering.clock()
    try:
        batch = await state(request).metering.store.run(
            lambda tx: batches.cancel_batch(tx, batch_id, team, admin, now))
    except batches.BatchError as e:
        raise _error(e) from None
    state(request).batch_runner.wake()
    return json_response(batch.to_dict())
