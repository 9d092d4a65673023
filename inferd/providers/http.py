"""HTTP plumbing shared by the remote deployments (`openai_compat.py`, `anthropic.py`).

`RemoteClient` owns one `aiohttp.ClientSession` per deployment (one connection
pool; retrying is the gateway's decision) and offers two calls:
`post_json` for a whole response body and `post_sse` for the events of a
server-sent-event stream. Both enforce the deployment's `Timeouts` with deadlines
on the event loop: `connect` through aiohttp; `first_token` from sending the request
to the first event of a stream; `stream_silence`
between two events; `total` over the whole call (the only limit on a
non-streamed answer, which arrives whole). Comment lines (`: keep-alive`) are
not events, so an upstream that stalls while sending keep-alives still times out.

Every failure leaves as a `InferdError`: error responses through the provider's
error-body reader (`ErrorReader`) with the `Retry-After` hint parsed here,
connection failures as `CONNECTION` (502), timeouts as `TIMEOUT` (504), a stream
whose body ends before its final event as `CONNECTION` with code
`stream_truncated`, and a chunk that is not a JSON object as `SERVER` with code
`malformed_chunk`.

`SSEParser` follows the WHATWG event-stream rules: lines end at CR, LF or CRLF and
nowhere else (U+2028 inside a JSON string is not a line break, unlike for
`str.splitlines`), the `data` lines of one event are joined by newlines, comments
and unknown fields are ignored. An event still open when the body ends is
delivered: servers that leave out the last blank line exist, and a truncated JSON
payload fails to parse anyway.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import msgspec

from inferd.providers.base import Timeouts
from inferd.wire.errors import ErrorKind, InferdError

T = TypeVar("T")

#: (status, the error body parsed as JSON or None, the body as text, Retry-After seconds) -> the error
ErrorReader = Callable[[int, Any, str, "float | None"], InferdError]

_LINE_END = re.compile(rb"\r\n|\r|\n")
# once the final event is in, the rest of the body is read for at most this long so that the
# connection goes back to the pool; an upstream that keeps it open only costs its connection
_DRAIN_SECONDS = 1.0


@dataclass(frozen=True, kw_only=True)
class RemoteConfig:
    """One remote deployment: where it is, which upstream model it calls, how long to wait."""

    name: str
    base_url: str
    model: str                      # the upstream model name; replaces the request's `model`
    api_key: str | None = None      # already resolved (no env lookups here)
    timeouts: Timeouts = Timeouts()
    headers: Mapping[str, str] = field(default_factory=dict)
    max_connections: int = 256

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: {self.base_url!r} must start with http:// or https://")
        if not self.model:
            raise ValueError(f"model: deployment {self.name!r} needs the upstream model name")
        if self.max_connections < 1:
            raise ValueError(f"max_connections: must be at least 1, got {self.max_connections}")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str  # the `event:` field, "message" when absent
    data: str


class SSEParser:
    """Incremental event-stream parser: `feed()` bytes as they come, `close()` at the end of the body."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._started = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        buffer, start = self._buffer + chunk, 0
        for match in _LINE_END.finditer(buffer):
            if match.end() == len(buffer) and match.group() == b"\r":
                break  # may be the first half of a CRLF split across two chunks
            self._line(buffer[start:match.start()], events)
            start = match.end()
        self._buffer = buffer[start:]
        return events

    def close(self) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if self._buffer:
            self._line(self._buffer, events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        if not raw:
            if self._data:
                events.append(SSEEvent(self._event or "message", "\n".join(self._data)))
            self._data, self._event = [], ""
            return
        line = raw.decode("utf-8", "replace")
        if not self._started:
            self._started, line = True, line.removeprefix("\ufeff")
        if line.startswith(":"):
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value


async def parse_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[SSEEvent]:
    parser = SSEParser()
    async for chunk in chunks:
        for event in parser.feed(chunk):
            yield event
    for event in parser.close():
        yield event


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI's precise form) or `Retry-After` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def parse_chunk(name: str, data: str) -> dict:
    """One streamed event's JSON object; anything else is the upstream's fault."""
    try:
        chunk = msgspec.json.decode(data)
    except msgspec.DecodeError:
        chunk = None
    if not isinstance(chunk, dict):
        raise InferdError(ErrorKind.SERVER, f"deployment {name!r}: the upstream sent a malformed chunk: "
                            f"{data[:200]!r}", status=502, code="malformed_chunk")
    return chunk


def require_endpoint(name: str, endpoints: frozenset[str], endpoint: str) -> None:
    if endpoint not in endpoints:
        raise InferdError(ErrorKind.INVALID_REQUEST, f"deployment {name!r} does not serve the {endpoint} "
                            f"endpoint; it serves {', '.join(sorted(endpoints))}", status=400)


_TIMEOUT_MESSAGES = {"first_token_timeout": "no first token within {:g} s",
                     "stream_silence_timeout": "the stream was silent for {:g} s",
                     "total_timeout": "the call took longer than {:g} s"}
#: when a wait must end (event-loop time, None: never), the error code it raises, the limit in seconds
_Limit = tuple["float | None", str, "float | None"]


class _Deadlines:
    """The deadlines of one call, in event-loop time, and the error each one raises."""

    def __init__(self, name: str, timeouts: Timeouts):
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._name, self._timeouts = name, timeouts
        self._first_at = None if timeouts.first_token is None else now + timeouts.first_token
        self._total_at = None if timeouts.total is None else now + timeouts.total

    def first_token(self) -> _Limit:
        return self._earliest(self._first_at, "first_token_timeout", self._timeouts.first_token)

    def total(self) -> _Limit:
        return self._earliest(None, "total_timeout", None)

    def silence(self) -> _Limit:
        silence = self._timeouts.stream_silence
        return self._earliest(None if silence is None else self._loop.time() + silence,
                              "stream_silence_timeout", silence)

    def _earliest(self, at: float | None, code: str, seconds: float | None) -> _Limit:
        if self._total_at is not None and (at is None or self._total_at <= at):
            return self._total_at, "total_timeout", self._timeouts.total
        return at, code, seconds

    async def within(self, awaitable: Awaitable[T], limit: _Limit) -> T:
        at, code, seconds = limit
        try:
            async with asyncio.timeout_at(at):
                return await awaitable
        except TimeoutError:
            raise InferdError(ErrorKind.TIMEOUT, f"deployment {self._name!r}: "
                                f"{_TIMEOUT_MESSAGES[code].format(seconds)}", status=504, code=code) from None


class RemoteClient:
    """The HTTP side of one remote deployment; `headers` are the provider's auth and version headers."""

    def __init__(self, config: RemoteConfig, *, headers: Mapping[str, str], read_error: ErrorReader):
        self._name, self._timeouts, self._read_error = config.name, config.timeouts, read_error
        self._base_url = config.base_url.rstrip("/")
        self._headers = {"content-type": "application/json", **headers, **config.headers}
        self._max_connections = config.max_connections
        self._session: aiohttp.ClientSession | None = None  # made on first use, on the loop that uses it

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300)
            # only connect is left to aiohttp; the other limits are deadlines over whole phases. The
            # proxy (HTTPS_PROXY / NO_PROXY) is looked up once: aiohttp's trust_env reads the
            # environment and ~/.netrc on every request
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, proxy=_proxy_for(self._base_url),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeouts.connect))
        return self._session

    async def post_json(self, path: str, body: dict) -> dict:
        deadlines = _Deadlines(self._name, self._timeouts)

        async def call() -> tuple[int, Mapping[str, str], bytes]:
            async with self._client().post(self._base_url + path, data=msgspec.json.encode(body)) as response:
                return response.status, response.headers, await response.read()

        # a non-streamed answer comes whole: only `total` can bound it (first_token would
        # cut every long generation)
        status, headers, content = await deadlines.within(self._guarded(call()), deadlines.total())
        if not 200 <= status < 300:
            raise self._error(status, headers, content)
        try:
            answer = msgspec.json.decode(content)
        except msgspec.DecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise InferdError(ErrorKind.SERVER, f"deployment {self._name!r}: the upstream answered with a body "
                                f"that is not a JSON object: {content[:200]!r}", status=502,
                                code="malformed_response")
        return answer

    async def post_sse(self, path: str, body: dict, *, is_last: Callable[[SSEEvent], bool],
                       last_name: str) -> AsyncIterator[SSEEvent]:
        """The stream's events up to and including the one `is_last` accepts (called `last_name` in errors)."""
        deadlines = _Deadlines(self._name, self._timeouts)
        response = await deadlines.within(self._guarded(self._client().post(
            self._base_url + path, data=msgspec.json.encode(body), headers={"accept": "text/event-stream"})),
            deadlines.first_token())
        try:
            # a JSON body on a stream is an error the server sent with a success status
            success = 200 <= response.status < 300
            if not success or response.headers.get("content-type", "").startswith("application/json"):
                content = await deadlines.within(self._guarded(response.read()), deadlines.first_token())
                raise self._error(502 if success else response.status, response.headers, content)
            async with aclosing(parse_sse(self._body(response))) as events:
                limit = deadlines.first_token()
                while (event := await deadlines.within(anext(events, None), limit)) is not None:
                    yield event
                    if is_last(event):
                        await _drain(events)
                        return
                    limit = deadlines.silence()
        finally:
            response.release()  # back to the pool when the body was read whole, closed otherwise
        raise InferdError(ErrorKind.CONNECTION, f"deployment {self._name!r}: the stream ended before "
                            f"{last_name}", status=502, code="stream_truncated")

    async def _body(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, ConnectionError) as exc:
            # aiohttp raises a cut connection's error before it hands over the bytes that arrived
            # ahead of the cut: pass them on first, or events the upstream did send would be lost
            for rest in list(getattr(response.content, "_buffer", ())):
                yield bytes(rest)
            raise self._transport_error(exc) from exc

    async def _guarded(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`, its transport failures as `InferdError`s (aiohttp's own timeouts among them, which
        must not pass for the deadline's)."""
        try:
            return await awaitable
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as exc:
            if isinstance(exc, asyncio.TimeoutError) and not isinstance(exc, aiohttp.ServerTimeoutError):
                raise
            raise self._transport_error(exc) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _error(self, status: int, headers: Mapping[str, str], content: bytes) -> InferdError:
        try:
            payload = msgspec.json.decode(content)
        except msgspec.DecodeError:
            payload = None  # an HTML error page from a proxy, say: the text becomes the message
        return self._read_error(status, payload, content[:1000].decode("utf-8", "replace").strip(),
                                parse_retry_after(headers))

    def _transport_error(self, exc: BaseException) -> InferdError:
        if isinstance(exc, aiohttp.ServerTimeoutError):
            return InferdError(ErrorKind.TIMEOUT, f"deployment {self._name!r}: {type(exc).__name__} "
                                 f"(connect timeout {self._timeouts.connect} s)", status=504, code="connect_timeout")
        return InferdError(ErrorKind.CONNECTION, f"deployment {self._name!r}: {type(exc).__name__}: "
                             f"{str(exc) or 'the connection was closed'}", status=502)


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url` (None: connect directly), as urllib reads it."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


async def _drain(events: AsyncIterator[SSEEvent]) -> None:
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in events:
                pass
    except (TimeoutError, InferdError):
        pass
