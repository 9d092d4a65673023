"""POST /v1/embeddings: routed like every other request, answered in one JSON body.

The body goes to the gateway as is (a remote OpenAI-compatible deployment gets it
untouched); a local embedding deployment validates it, batches it with other
clients' inputs in its own process, and answers in OpenAI's format. The response
carries the same `x-inferd-*` headers as chat and completions, and is metered like them.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from inferd.api.metered_calls import answer_whole
from inferd.api.protocol import principal, read_json, state
from inferd.gateway.router import Route
from inferd.wire.errors import http_error

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(request: Request):
    body = await read_json(request)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        # checked before anything reads it: a non-string model must not reach routing or the ledger
        raise http_error(400, f"model: must be a string, got {type(model).__name__}", param="model")
    st = state(request)
    group = st.gateway.resolve(model, "embeddings")
    meter = await st.metering.begin(principal(request), "embeddings", group.name, body,
                                    request_id=request.state.request_id)
    route = Route(model, "embeddings")
    request.state.route = route
    return await answer_whole(request, meter, route, "embeddings", body)
