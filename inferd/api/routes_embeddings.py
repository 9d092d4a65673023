"""POST /v1/embeddings: routed like every other request, answered in one JSON body.

The body is parsed at the edge like chat's (a non-string `model` or a bad
`input` is a 400 before anything reads it); a remote OpenAI-compatible
deployment gets it as the client sent it, a local embedding deployment batches
it with other clients' inputs in its own process and answers in OpenAI's
format. The response carries the same `x-inferd-*` headers as chat and
completions, and is metered like them.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from inferd.api.metered_calls import answer_whole
from inferd.api.protocol import admit_body

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(request: Request):
    return await answer_whole(request, await admit_body(request, "embeddings"))
