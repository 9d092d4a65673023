"""Running a request through the gateway with its meter: settled however it ends.

`metered` awaits the gateway's work and, if it fails or the client leaves,
settles the meter with the status the client gets. `answer_whole` is the whole
(non-streamed) answer of chat, completions and embeddings: from the response
cache when the caller asked for it and a fresh answer is there, else from the
gateway (then stored, if asked); the ledger row is written after the response
is sent.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from inferd.api.protocol import cancel_on_disconnect, json_response, principal, spawn, state
from inferd.gateway.router import Route
from inferd.tenancy.intake import Admission
from inferd.tenancy.metering import RequestMeter
from inferd.tenancy.response_cache import cache_key, requested_ttl
from inferd.wire.errors import client_error, http_error


async def metered(meter: RequestMeter, route: Route, work: Awaitable) -> Any:
    """Await the gateway's work; if it fails (or the client leaves), settle the meter with that status."""
    try:
        return await work
    except BaseException as e:
        error = client_error(e) if isinstance(e, Exception) else None
        status = error.status if error is not None else 499
        await meter.finish(status, route, cancelled=status == 499)
        raise


async def answer_whole(request: Request, admission: Admission) -> Response:
    st = state(request)
    typed, meter, route = admission.request, admission.meter, admission.route
    who = principal(request)
    try:
        ttl = requested_ttl(request.headers.get("x-inferd-cache-ttl"), who.cache_ttl if who else None)
    except ValueError as e:
        await meter.finish(400, route)
        raise http_error(400, str(e), code="invalid_cache_ttl") from None
    key = cache_key(typed) if ttl else None
    if key is not None:
        cached = await st.response_cache.lookup(key, ttl)
        if cached is not None:
            if "id" in cached:  # chat and completions answers have one, embeddings none
                cached["id"] = typed.response_id
            meter.usage(cached.get("usage"))
            return json_response(cached, headers={"x-inferd-cache": "hit"},
                                 background=BackgroundTask(meter.finish, 200, None, cache_hit=True))
    answer = await metered(meter, route, cancel_on_disconnect(request, st.gateway.request(typed, route)))
    if "id" in answer:  # a remote provider's answer carries the upstream's own
        answer["id"] = typed.response_id
    meter.usage(answer.get("usage"))
    headers = route.headers()
    if key is not None:
        headers["x-inferd-cache"] = "miss"
        spawn(st.response_cache.save(key, answer, ttl))
    return json_response(answer, headers=headers, background=BackgroundTask(meter.finish, 200, route))
