"""The OpenAI wire format: request models, and the plumbing both route modules share.

Request models use OpenAI's field names, plus vLLM's sampling extras (top_k,
min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids,
include_stop_str_in_output, skip_special_tokens, prompt_logprobs). Pydantic
checks shapes and bounds (so nothing out of range reaches msgpack or torch);
`SamplingParams` checks meaning and names the offending parameter. Unknown
fields are ignored, as vLLM does, so clients that send extras keep working.

The plumbing: `ServerState` (what routes need from the app), SSE framing and
JSON responses, `usage()`, and running engine streams for one HTTP request:
`first_outputs` (admission errors surface before any byte is sent, as a proper
status code), `merge` (several prompts' streams as one), and
`cancel_on_disconnect` (a client that goes away aborts its requests).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request
from starlette.responses import Response

from inferd.api.errors import APIError
from inferd.api.metrics import Metrics
from inferd.engine.async_client import AsyncEngine
from inferd.engine.outputs import RequestOutput
from inferd.engine.sampling_params import SamplingParams

_I32 = 2**31 - 1
_I63 = 2**63 - 1


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # many clients send `"field": null` for "not set"
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Base):
    include_usage: bool = False


class _SamplingRequest(_Base):
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=-_I63, le=_I63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, le=_I32)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=_I32)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=-_I32, le=_I32)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None) -> SamplingParams:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if any(not -_I32 <= t <= _I32 for t in self.stop_token_ids or []):
            raise APIError(400, "stop_token_ids: values must be 32-bit integers", param="stop_token_ids")

        def opt(value, default):
            return default if value is None else value

        return SamplingParams(
            n=self.n, temperature=opt(self.temperature, 1.0), top_p=opt(self.top_p, 1.0),
            top_k=opt(self.top_k, 0), min_p=opt(self.min_p, 0.0), seed=self.seed,
            presence_penalty=opt(self.presence_penalty, 0.0),
            frequency_penalty=opt(self.frequency_penalty, 0.0),
            repetition_penalty=opt(self.repetition_penalty, 1.0), max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=-_I32, le=_I32)
    echo: bool = False
    logprobs: int | None = Field(None, ge=-_I32, le=_I32)
    best_of: int | None = Field(None, ge=-_I32, le=_I32)
    suffix: str | None = None


class ContentPart(_Base):
    type: str
    text: str | None = None


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=-_I32, le=_I32)
    max_completion_tokens: int | None = Field(None, ge=-_I32, le=_I32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=-_I32, le=_I32)
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True


# -- shared state and wire helpers --------------------------------------------------------

@dataclass
class ServerState:
    engine: AsyncEngine
    metrics: Metrics
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")


def state(request: Request) -> ServerState:
    return request.app.state.inferd


def json_response(obj: Any, status: int = 200) -> Response:
    # msgspec writes non-finite floats as null, so the body is always valid JSON
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


# Characters that str.splitlines() treats as line breaks although SSE does not
# (U+0085, U+2028, U+2029). Models do emit them, and clients that read the
# stream with splitlines-based readers (httpx's iter_lines among them) would cut
# an event in two; JSON lets us write them escaped instead.
_SPLITLINES_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"),
                      (b"\xe2\x80\xa9", b"\\u2029"))


def sse(obj: Any) -> bytes:
    data = msgspec.json.encode(obj)
    for raw, escaped in _SPLITLINES_BREAKS:
        if raw in data:  # UTF-8 is self-synchronizing: these bytes are only ever that character
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI usage; `cached_tokens` are prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# -- running engine streams for one HTTP request ------------------------------------------

Stream = AsyncIterator[RequestOutput]


async def close_all(streams: list[Stream]) -> None:
    for s in streams:
        await s.aclose()


async def first_outputs(streams: list[Stream]) -> list[RequestOutput]:
    """The first output of every stream; on any error all streams are closed (aborted)."""
    try:
        return list(await gather_or_cancel([s.__anext__() for s in streams]))
    except BaseException:
        await close_all(streams)
        raise


async def final_outputs(streams: list[Stream]) -> list[RequestOutput]:
    async def last(s: Stream) -> RequestOutput:
        out = None
        async for out in s:
            pass
        return out

    try:
        return list(await gather_or_cancel([last(s) for s in streams]))
    finally:
        await close_all(streams)


async def gather_or_cancel(aws: list[Awaitable]) -> list:
    """Like gather, but the first failure cancels the rest."""
    if len(aws) == 1:
        return [await aws[0]]
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge(streams: list[Stream], firsts: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams, each starting with its first output."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for out in streams[i]:
                queue.put_nowait((i, out, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, e))
        queue.put_nowait((i, None, None))

    tasks: list[asyncio.Task] = []
    try:
        for i, out in enumerate(firsts):
            yield i, out
        live = [i for i, out in enumerate(firsts) if not out.finished]
        if len(live) == 1:  # the common case: no tasks, no queue
            async for out in streams[live[0]]:
                yield live[0], out
            return
        tasks = [asyncio.create_task(pump(i)) for i in live]
        remaining = len(live)
        while remaining:
            i, out, err = await queue.get()
            if err is not None:
                raise err
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)


async def cancel_on_disconnect(request: Request, work: Awaitable) -> Any:
    """Await `work`, cancelling it if the client disconnects first (its requests abort)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        raise APIError(499, "the client closed the request", type="client_closed_request")
    return task.result()
