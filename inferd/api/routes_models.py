"""The admin API for model versions and the gateway config, for admin keys only (docs/models.md).

- `GET /admin/models`, `GET /admin/models/{model}`: what each group serves here (stable,
  canary and its share, the loaded versions with their health and what is in flight on
  them) and its versions in the store.
- `POST /admin/models/{model}/deploy` `{"spec": ..., "canary": 10, "label": "q4"}`: load the
  spec as a version (a new one, or the one it already is) and send it `canary` percent of
  the API keys, or all traffic without `canary`. A version that fails to load is a 422
  saying why; what was serving goes on serving.
- `POST /admin/models/{model}/promote`, `POST /admin/models/{model}/rollback` `{"reason": ...}`.
- `GET /admin/models/{model}/history?limit=`: deploys, promotions, rollbacks (automatic ones
  with their reason) and failed loads, newest first.
- `POST /admin/config/reload`: read the `--config` file again and serve it, as SIGHUP does.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from inferd.api.protocol import json_response, read_model, state
from inferd.gateway.version_store import VersionError
from inferd.gateway.versions import VersionManager
from inferd.wire.errors import http_error

router = APIRouter()


class DeployBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] | list[dict[str, Any]]
    canary: float | None = Field(None, description="percent of API keys sent to the new version")
    label: str | None = Field(None, max_length=64)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=500)


def _versions(request: Request) -> VersionManager:
    versions = state(request).versions
    if versions is None:
        raise http_error(400, "this server keeps no model versions")
    return versions


async def _answer(work) -> Any:
    try:
        return json_response(await work)
    except VersionError as e:
        raise http_error(e.status, e.message, param=e.param, code="model_version_error") from None


@router.get("/admin/models")
async def list_models(request: Request):
    versions = _versions(request)
    try:
        data = await versions.describe()
    except VersionError as e:
        raise http_error(e.status, e.message, param=e.param) from None
    return json_response({"object": "list", "data": data})


@router.get("/admin/models/{model}")
async def get_model(request: Request, model: str):
    async def one():
        return (await _versions(request).describe(model))[0]
    return await _answer(one())


@router.post("/admin/models/{model}/deploy")
async def deploy(request: Request, model: str):
    body = await read_model(request, DeployBody)
    return await _answer(_versions(request).deploy(model, body.spec, label=body.label, canary_percent=body.canary))


@router.post("/admin/models/{model}/promote")
async def promote(request: Request, model: str):
    return await _answer(_versions(request).promote(model))


@router.post("/admin/models/{model}/rollback")
async def rollback(request: Request, model: str):
    body = await read_model(request, RollbackBody) if await request.body() else RollbackBody()
    return await _answer(_versions(request).rollback(model, body.reason))


@router.get("/admin/models/{model}/history")
async def history(request: Request, model: str, limit: int = 100):
    async def events():
        return {"object": "list", "data": await _versions(request).history(model, max(1, min(limit, 1000)))}
    return await _answer(events())


@router.post("/admin/config/reload")
async def reload_config(request: Request):
    st = state(request)
    if st.config_path is None:
        raise http_error(400, "this server was started without --config: there is no config to reload")
    try:
        report = await _versions(request).reload_file(st.config_path)
    except ValueError as e:
        raise http_error(400, str(e), code="invalid_config") from None
    return json_response(report)
