"""Deployments on any server that speaks the OpenAI API (OpenAI, vLLM, llama.cpp, Ollama, another inferd).

`OpenAICompatDeployment` forwards the request body as is, with `model` replaced by
the configured upstream model, to `{base_url}/chat/completions`, `/completions` or
`/embeddings`; `base_url` is what the OpenAI SDK calls it, e.g.
`https://api.openai.com/v1`. HTTP, timeouts and error classification live in
`providers/http.py`; this module adds the OpenAI error body and the stream's shape.

Streams are sent with `stream: true` and `stream_options.include_usage: true`
whatever the client asked, and always end with one chunk that has `choices: []`
and the usage: a usage block that arrives on a chunk with choices is moved to that
final chunk. Upstreams that ignore `include_usage` send no usage at all; then the
final chunk carries `"usage": null` rather than failing an answer that arrived in
full, and the gateway meters such calls as of unknown size. A failure reported
inside the stream (`data: {"error": {...}}`, as vLLM does) raises like an error
response, with the status taken from an integer `code` when there is one. A body
that ends without `[DONE]` after every choice had its `finish_reason` is a whole
answer (some servers leave `[DONE]` out); one that ends earlier is truncated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from inferd.providers.base import Deployment, usage_unknown_chunk
from inferd.providers.http import RemoteClient, RemoteConfig, SSEEvent, parse_chunk, require_endpoint
from inferd.wire.errors import ErrorKind, InferdError, classify_status
from inferd.wire.request import ENDPOINT_PATHS, Endpoint, InferenceRequest



@dataclass(frozen=True, kw_only=True)
class OpenAICompatConfig(RemoteConfig):
    endpoints: frozenset[str] = frozenset({"chat", "completions"})
    prefill: bool = False  # the server takes vLLM's continue_final_message (vLLM, inferd; not OpenAI)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = self.endpoints - ENDPOINT_PATHS.keys()
        if unknown or not self.endpoints:
            raise ValueError(f"endpoints: {sorted(unknown) or 'none given'}; allowed: {sorted(ENDPOINT_PATHS)}")


def read_openai_error(status: int, payload: Any, text: str, retry_after: float | None) -> InferdError:
    """The `InferdError` for an OpenAI-style error body, or for whatever else the server sent."""
    message, code, param = None, None, None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message, code, param = error.get("message"), error.get("code"), error.get("param")
    elif isinstance(error, str):
        message = error
    elif isinstance(payload, dict):  # vLLM's {"message": ...}, FastAPI's {"detail": ...}
        message = payload.get("message") or payload.get("detail")
    message = str(message or text or f"the upstream answered HTTP {status}")
    # some servers put the HTTP status in `code`; only a string code means something to clients
    return classify_status(status, message, code if isinstance(code, str) else None,
                           param=param if isinstance(param, str) else None, retry_after=retry_after)


def _in_stream_error(chunk: dict, data: str) -> InferdError:
    """vLLM and others report a failure after the headers as a chunk `{"error": {...}}`."""
    error = chunk["error"]
    code = error.get("code") if isinstance(error, dict) else None
    return read_openai_error(code if isinstance(code, int) and 400 <= code < 600 else 502, chunk, data, None)


def _track_finish(chunk: dict, open_choices: set[int]) -> None:
    for choice in chunk.get("choices") or ():
        if choice.get("finish_reason") is None:
            open_choices.add(choice.get("index", 0))
        else:
            open_choices.discard(choice.get("index", 0))


def _is_done(event: SSEEvent) -> bool:
    return event.data.strip() == "[DONE]"


# inferd's own request extensions, which a provider's API would refuse as unknown arguments
class OpenAICompatDeployment(Deployment):
    def __init__(self, config: OpenAICompatConfig):
        self.name, self.endpoints, self.config = config.name, config.endpoints, config
        self.takes_prefill = config.prefill
        auth = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._http = RemoteClient(config, headers=auth, read_error=read_openai_error)

    def _path(self, endpoint: Endpoint) -> str:
        require_endpoint(self.name, self.endpoints, endpoint)
        return ENDPOINT_PATHS[endpoint].removeprefix("/v1")  # base_url ends where the SDK's does

    async def request(self, request: InferenceRequest) -> dict:
        path = self._path(request.endpoint)
        upstream = request.passthrough(self.config.model)
        if request.endpoint != "embeddings":
            upstream["stream"] = False
            upstream.pop("stream_options", None)  # OpenAI rejects it on non-streamed calls
        return await self._http.post_json(path, upstream)

    async def stream(self, request: InferenceRequest) -> AsyncIterator[dict]:
        if request.endpoint == "embeddings":
            raise InferdError(ErrorKind.INVALID_REQUEST, "embeddings cannot be streamed", status=400,
                              param="stream")
        path = self._path(request.endpoint)
        upstream = request.passthrough(self.config.model)
        # always ask for usage: the gateway meters every stream
        upstream["stream"] = True
        upstream["stream_options"] = {**(upstream.get("stream_options") or {}), "include_usage": True}
        last: dict = {}
        final: dict | None = None
        open_choices: set[int] = set()  # choices seen without their finish_reason yet
        try:
            async with aclosing(self._http.post_sse(path, upstream, is_last=_is_done,
                                                    last_name="[DONE]")) as events:
                async for event in events:
                    if _is_done(event):
                        continue  # post_sse ends the iteration once it has read the rest of the body
                    chunk = parse_chunk(self.name, event.data)
                    if "error" in chunk and not chunk.get("choices"):
                        raise _in_stream_error(chunk, event.data)
                    _track_finish(chunk, open_choices)
                    if chunk.get("usage"):
                        final = {**chunk, "choices": []}
                        if not chunk.get("choices"):
                            continue
                        chunk = {key: value for key, value in chunk.items() if key != "usage"}
                    last = chunk
                    yield chunk
        except InferdError as e:
            # every choice has its finish_reason: the answer is whole, whether or not [DONE] came
            if e.code != "stream_truncated" or open_choices or not last:
                raise
        yield final or usage_unknown_chunk(last)

    async def aclose(self) -> None:
        await self._http.aclose()
