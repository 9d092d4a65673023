"""POST /v1/chat/completions and /v1/completions: validate at the edge, route, answer.

The body is checked against the wire models first, so a malformed request gets
the same 400 whatever deployment would have served it; the raw body then goes to
the gateway, so fields a remote provider understands (tools, response_format)
reach it untouched. A non-streamed answer is one JSON body; a streamed one starts
only after the gateway has a first chunk (so failures before it are retried or
fall back invisibly, and those that remain get a proper status code), then runs
to `data: [DONE]`, or ends with an error event if the deployment fails mid-way.

Whatever deployment answered, the response id is derived from the request id,
the `model` field names the model that answered, and `x-inferd-*` headers say
which deployment it was, after how many attempts, and whether it fell back or
was degraded. Deployments always end streams with a usage chunk; it is passed on
only when the client asked (`stream_options.include_usage`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import StreamingResponse

from inferd.api.errors import api_error
from inferd.api.protocol import SSE_DONE, SSE_HEADERS, cancel_on_disconnect, json_response, read_json, sse, state
from inferd.gateway.router import OpenStream, Route
from inferd.providers.base import ProviderError
from inferd.providers.openai_schema import ChatCompletionRequest, CompletionRequest, validation_error

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request):
    return await _serve(request, "chat", ChatCompletionRequest, "chatcmpl")


@router.post("/v1/completions")
async def create_completion(request: Request):
    return await _serve(request, "completions", CompletionRequest, "cmpl")


async def _serve(request: Request, endpoint: str, schema, id_prefix: str):
    body = await read_json(request)
    try:
        parsed = schema.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    gateway = state(request).gateway
    route = Route(body.get("model"), endpoint)
    request.state.route = route
    response_id = f"{id_prefix}-{request.state.request_id}"
    if not parsed.stream:
        answer = await cancel_on_disconnect(request, gateway.request(endpoint, body, route))
        answer["id"] = response_id
        return json_response(answer, headers=route.headers())
    stream = await cancel_on_disconnect(request, gateway.open_stream(endpoint, body, route))
    return StreamingResponse(_events(stream, response_id, parsed.include_usage), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **route.headers()})


async def _events(stream: OpenStream, response_id: str, include_usage: bool):
    try:
        async for chunk in stream:
            is_usage = not chunk.get("choices") and "usage" in chunk
            if is_usage and not include_usage:
                continue
            chunk["id"] = response_id
            if include_usage:
                chunk.setdefault("usage", None)
            yield sse(chunk)
        yield SSE_DONE
    except ProviderError as e:  # after the first chunk: the stream says why it ends, never a clean finish
        yield sse(api_error(e).body())
    finally:
        await stream.aclose()
