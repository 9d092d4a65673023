"""GET /v1/usage: showback from the ledger, grouped as asked.

`?start=&end=` (Unix seconds or ISO dates/times, end exclusive), `group_by=`
any of team, model, key, day, deployment, served_model, endpoint, version (the
model version that answered), `tz=` (an IANA
time zone: the one `day` groups by, UTC by default), and for admins `team=` /
`key=` filters. An admin key (or an open server) sees every team; any
other key sees its own team only, and asking for another team is refused.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from inferd.api.protocol import json_response, principal, state
from inferd.tenancy import showback
from inferd.wire.errors import http_error

router = APIRouter()


@router.get("/v1/usage")
async def usage(request: Request, start: str | None = None, end: str | None = None, group_by: str | None = None,
                team: str | None = None, key: str | None = None, tz: str | None = None):
    try:
        t0 = showback.parse_time(start) if start else None
        t1 = showback.parse_time(end) if end else None
        groups = showback.parse_group_by(group_by)
    except ValueError as e:
        raise http_error(400, str(e)) from None
    try:
        zone = showback.parse_tz(tz)
    except ValueError as e:
        raise http_error(400, str(e), param="tz") from None
    who = principal(request)
    if who is not None and not who.is_admin:
        if team is not None and team != who.team:
            raise http_error(403, "a key sees its own team's usage only", param="team", code="forbidden_team")
        team = who.team
    metering = state(request).metering
    await metering.flush()  # this replica's requests that ended a moment ago are counted too
    rows = await metering.store.run(
        lambda tx: showback.usage_report(tx, start=t0, end=t1, group_by=groups, team=team, key_id=key, tz=zone))
    return json_response({"object": "list", "start": t0, "end": t1, "group_by": groups, "tz": str(zone),
                          "data": [r.to_dict() for r in rows]})
