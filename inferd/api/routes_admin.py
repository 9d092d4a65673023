"""The admin API: keys and teams (`/admin/keys`, `/admin/teams`), for admin keys only.

It does what `inferd keys` and `inferd teams` do on the command line, through the
running server: a new key's secret is in the creation response and nowhere else;
lists never carry secrets. The middleware has already refused non-admin keys.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from inferd.api.protocol import json_response, read_model, state
from inferd.tenancy import keys
from inferd.tenancy.keys import BudgetPeriod, Limits
from inferd.wire.errors import http_error

router = APIRouter()


class LimitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget_usd: float | None = Field(None, ge=0)
    budget_period: BudgetPeriod = "monthly"
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_parallel: int | None = Field(None, ge=1)

    def limits(self) -> Limits:
        return Limits(self.budget_usd, self.budget_period, self.rpm, self.tpm, self.max_parallel)


class KeyBody(LimitsBody):
    team: str = Field(min_length=1, max_length=64)
    name: str | None = Field(None, max_length=128)
    admin: bool = False
    cache_ttl: float | None = Field(None, gt=0)


def _now(request: Request) -> float:
    return state(request).metering.clock()


@router.post("/admin/keys")
async def create_key(request: Request):
    body = await read_model(request, KeyBody)
    st = state(request)
    now = _now(request)
    info, secret = await st.metering.store.run(lambda tx: keys.create_key(
        tx, team=body.team, now=now, name=body.name, limits=body.limits(), is_admin=body.admin,
        cache_ttl=body.cache_ttl))
    st.authenticator.forget()
    return json_response({**info.to_dict(), "key": secret}, status=201)


@router.get("/admin/keys")
async def list_keys(request: Request, team: str | None = None, include_revoked: bool = False):
    rows = await state(request).metering.store.run(lambda tx: keys.list_keys(tx, team, include_revoked))
    return json_response({"object": "list", "data": [k.to_dict() for k in rows]})


@router.delete("/admin/keys/{key_id}")
async def revoke_key(request: Request, key_id: str):
    st = state(request)
    now = _now(request)
    if not await st.metering.store.run(lambda tx: keys.revoke_key(tx, key_id, now)):
        raise http_error(404, f"no live key has the id {key_id!r}", param="key_id", code="key_not_found")
    st.authenticator.forget()
    return json_response({"id": key_id, "revoked": True})


@router.put("/admin/teams/{team}")
async def set_team(request: Request, team: str):
    body = await read_model(request, LimitsBody)
    now = _now(request)
    info = await state(request).metering.store.run(lambda tx: keys.set_team(tx, team, body.limits(), now))
    state(request).authenticator.forget()
    return json_response(info.to_dict())


@router.get("/admin/teams")
async def list_teams(request: Request):
    rows = await state(request).metering.store.run(keys.list_teams)
    return json_response({"object": "list", "data": [t.to_dict() for t in rows]})
