"""POST /v1/chat/completions and /v1/completions: validate at the edge, route, answer.

The body is parsed once, at the edge, into the typed request every layer below
reads (wire/request.py), so a malformed request gets the same 400 whatever
deployment would have served it; remote OpenAI-compatible providers still get
the body as the client sent it, so fields they understand (tools,
response_format) reach them untouched. A non-streamed answer is one JSON body; a streamed one starts
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
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from inferd.api.metered_calls import answer_whole, metered
from inferd.api.protocol import SSE_DONE, SSE_HEADERS, admit_body, cancel_on_disconnect, spawn, sse, state
from inferd.gateway.router import OpenStream
from inferd.tenancy.intake import Admission
from inferd.tenancy.metering import RequestMeter
from inferd.wire.errors import InferdError, client_error

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request):
    return await _serve(request, await admit_body(request, "chat"))


@router.post("/v1/completions")
async def create_completion(request: Request):
    return await _serve(request, await admit_body(request, "completions"))


async def _serve(request: Request, admission: Admission):
    typed, meter, route = admission.request, admission.meter, admission.route
    if not typed.stream:
        return await answer_whole(request, admission)
    gateway = state(request).gateway
    stream = await metered(meter, route, cancel_on_disconnect(request, gateway.open_stream(typed, route)))
    events = _Events(stream, meter, typed.response_id, typed.body.include_usage, typed.body.continuous_usage)
    return StreamingResponse(events.run(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **route.headers()}, background=BackgroundTask(events.finish))


class _Events:
    """A stream's SSE events, and its settlement however it ends (done, broken, or the client left)."""

    def __init__(self, stream: OpenStream, meter: RequestMeter, response_id: str, include_usage: bool,
                 continuous_usage: bool):
        self.stream, self.meter, self.response_id = stream, meter, response_id
        self.include_usage, self.continuous_usage = include_usage, continuous_usage
        self.status: int | None = None  # None until the stream ends: the client went away

    async def run(self):
        try:
            async for chunk in self.stream:
                self.meter.chunk(chunk)
                if chunk.get("choices"):
                    if not self.continuous_usage:  # local deployments count as they go
                        chunk.pop("usage", None)
                elif "usage" in chunk and not self.include_usage:
                    continue
                chunk["id"] = self.response_id
                if self.include_usage:
                    chunk.setdefault("usage", None)
                yield sse(chunk)
            self.status = 200
            yield SSE_DONE
        except InferdError as e:  # after the first chunk: the stream says why it ends, never a clean finish
            error = client_error(e)
            self.status = error.status
            yield sse(error.body())
        finally:
            # the settlement must not be cut short by the cancellation that may be running through here
            spawn(self.finish())

    async def finish(self) -> None:
        await self.stream.aclose()
        await self.meter.finish(self.status or 499, self.stream.route, cancelled=self.status is None)
