"""A fault-injectable mock LLM provider: a real HTTP/1.1 server on 127.0.0.1.

`MockUpstream` serves the OpenAI API (`/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings`, `/v1/models`, streamed and not) and the Anthropic Messages API
(`/v1/messages`) with deterministic answers, so provider and gateway tests can
run against real sockets. It is a small server on asyncio streams rather than
uvicorn because the faults need control below HTTP: a reset socket, a body cut
half-way, a connection that never answers.

Answers: the reply is `max_tokens` words (or `reply_words` when the request sets
no limit) taken from a fixed word list, streamed one word per chunk; a stop
string equal to one of those words ends the reply before it. Usage is consistent:
prompt tokens = whitespace-separated words of the input text, completion tokens =
words generated. Every answer names the model the mock was given (`model=`). A
request that ends with an assistant message and sets `continue_final_message`
(any Anthropic request that ends so) continues it: the words after the prefill's;
`prefill=False` refuses `continue_final_message` with a 400, as OpenAI does.

`hold_streams()` makes streams wait after their first event until
`release_streams()` (`held` counts them): requests in flight for as long as a test
needs, with no timing in it.

Faults (`Fault`) are queued with `inject()` and consumed one per request, first
in first out; `set_persistent()` applies one fault to every request (after the
queue is empty) until `clear_faults()` or until its duration ends, to model an
upstream that is down for a while and recovers. `POST /_control` does the same
over HTTP for a mock running in another process (`python -m
tests.gateway.mock_upstream --port 9000`). Every request is recorded
(`requests`) unless `record=False`, which with the `latency` knob makes the mock
a cheap upstream for throughput benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
CREATED = 1_700_000_000
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 529: "Overloaded"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    500: "api_error", 529: "overloaded_error"}
# (status, OpenAI message, OpenAI code, Anthropic message) of the two refusals the mock can play
_REFUSALS = {
    "context_length": (400, "This model's maximum context length is 8192 tokens. However, your messages "
                            "resulted in 9000 tokens.", "context_length_exceeded",
                       "prompt is too long: 9000 tokens > 8192 maximum"),
    "content_policy": (400, "Your request was rejected as a result of our safety system.",
                       "content_policy_violation", "Output blocked by content filtering policy"),
}
FAULT_KINDS = frozenset({"error", "reset", "hang", "slow_first_token", "cut", "stall", "malformed", "no_done",
                         "error_event", *_REFUSALS})


@dataclass(frozen=True)
class Fault:
    """One misbehaviour. Build it with the class methods; `after` counts the events sent first.

    On a non-streamed answer `cut`, `stall` and `malformed` act on the body: half of it is sent.
    """

    kind: str
    status: int = 500
    message: str = "injected fault"
    retry_after: str | None = None
    retry_after_ms: str | None = None
    raw_body: str | None = None
    after: int = 0
    delay: float = 0.0
    before_headers: bool = False

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(FAULT_KINDS)}")

    @classmethod
    def error(cls, status: int, message: str = "injected fault", *, retry_after: str | float | None = None,
              retry_after_ms: str | float | None = None, raw_body: str | None = None) -> Fault:
        """An error status with the API's error body (or `raw_body` as is, e.g. an HTML page)."""
        return cls("error", status, message, None if retry_after is None else str(retry_after),
                   None if retry_after_ms is None else str(retry_after_ms), raw_body)

    @classmethod
    def reset(cls) -> Fault:
        """Read the request, then reset the connection (RST) before any header."""
        return cls("reset")

    @classmethod
    def hang(cls) -> Fault:
        """Read the request and never answer, keeping the connection open."""
        return cls("hang")

    @classmethod
    def slow_first_token(cls, delay: float, *, before_headers: bool = False) -> Fault:
        """Wait `delay` s before the first event (or before the headers), then answer normally."""
        return cls("slow_first_token", delay=delay, before_headers=before_headers)

    @classmethod
    def cut(cls, after: int) -> Fault:
        """Close the connection after `after` events, without the end of the body."""
        return cls("cut", after=after)

    @classmethod
    def stall(cls, after: int) -> Fault:
        """Send `after` events, then nothing more, keeping the connection open."""
        return cls("stall", after=after)

    @classmethod
    def malformed(cls, after: int) -> Fault:
        """Replace event number `after` with a data line that is not valid JSON."""
        return cls("malformed", after=after)

    @classmethod
    def error_event(cls, after: int, status: int = 529, message: str = "Overloaded") -> Fault:
        """Replace event number `after` with an error event (vLLM's `{"error"}` chunk, Anthropic's `error`)
        and end the body there."""
        return cls("error_event", status, message, after=after)

    @classmethod
    def no_done(cls) -> Fault:
        """End the body cleanly but leave out the terminating `[DONE]` (`message_stop`)."""
        return cls("no_done")

    @classmethod
    def context_length(cls) -> Fault:
        return cls("context_length")

    @classmethod
    def content_policy(cls) -> Fault:
        return cls("content_policy")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any


class MockUpstream:
    """The server; `start()`/`stop()` or a `with` block. `url` is the root, `openai_base_url` adds /v1."""

    def __init__(self, *, model: str = "mock-model", api_key: str | None = None, latency: float = 0.0,
                 chunk_interval: float = 0.0, reply_words: int = 8, record: bool = True,
                 honour_include_usage: bool = True, prefill: bool = True, port: int = 0):
        self.model, self.api_key, self.latency = model, api_key, latency
        self.prefill = prefill  # False: refuses vLLM's continue_final_message, as OpenAI does
        self.honour_include_usage = honour_include_usage
        self.chunk_interval, self.reply_words, self.record = chunk_interval, reply_words, record
        self.port = port
        self._faults: deque[Fault] = deque()
        self._persistent: tuple[Fault, float] | None = None  # (fault, until on time.monotonic)
        self._requests: list[RecordedRequest] = []
        self._count = 0
        self.connections = 0  # accepted so far: tells whether clients reuse connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._gate: asyncio.Event | None = None  # clear: streams wait after their first event
        self.held = 0  # streams waiting at the gate now

    # --- control, from any thread -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def inject(self, *faults: Fault) -> None:
        self._faults.extend(faults)

    def set_persistent(self, fault: Fault, duration: float | None = None) -> None:
        self._persistent = (fault, float("inf") if duration is None else time.monotonic() + duration)

    def hold_streams(self) -> None:
        """Streams from now on wait after their first event until `release_streams()`: requests that stay in
        flight for as long as a test needs, without timing."""
        asyncio.run_coroutine_threadsafe(self._set_gate(False), self._loop).result(10)

    def release_streams(self) -> None:
        asyncio.run_coroutine_threadsafe(self._set_gate(True), self._loop).result(10)

    async def _set_gate(self, open_: bool) -> None:
        self._gate.set() if open_ else self._gate.clear()

    def clear_faults(self) -> None:
        self._faults.clear()
        self._persistent = None

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self._requests)

    def count(self, path: str | None = None) -> int:
        """Requests served (all of them, or those to `path`; the latter needs `record=True`)."""
        return self._count if path is None else sum(r.path == path for r in self._requests)

    def reset_requests(self) -> None:
        self._requests.clear()
        self._count = self.connections = 0

    def start(self) -> MockUpstream:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", self.port, backlog=1024))
            self.port = self._server.sockets[0].getsockname()[1]
            self._gate = asyncio.Event()
            self._gate.set()
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="mock-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the server, on its own loop ----------------------------------------------------------

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._tasks):  # hanging and stalled connections end here
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _next_fault(self) -> Fault | None:
        try:
            return self._faults.popleft()
        except IndexError:
            pass
        persistent = self._persistent
        if persistent is None:
            return None
        if time.monotonic() < persistent[1]:
            return persistent[0]
        self._persistent = None
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:  # keep-alive: one request after another on this connection
                request = await _read_request(reader)
                if request is None or not await self._respond(*request, writer):
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        except asyncio.CancelledError:  # stop(): end quietly, the task was ours to cancel
            return
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _respond(self, method: str, path: str, headers: dict[str, str], raw: bytes,
                       writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must end."""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return await self._send(writer, 400, {"error": {"message": "the body is not JSON", "code": None}})
        if path == "/_control":
            try:
                return await self._send(writer, 200, self._control(body))
            except (TypeError, ValueError) as exc:
                return await self._send(writer, 400, {"error": {"message": str(exc), "code": None}})
        self._count += 1
        if self.record:
            self._requests.append(RecordedRequest(method, path, headers, body))
        anthropic = path == "/v1/messages"
        fault = self._next_fault()
        if self.latency:
            await asyncio.sleep(self.latency)
        if fault is not None:
            if fault.kind == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            if fault.kind == "hang":
                await asyncio.get_running_loop().create_future()
            if fault.kind == "slow_first_token" and fault.before_headers:
                await asyncio.sleep(fault.delay)
            if fault.kind == "error" or fault.kind in _REFUSALS:
                return await self._send_error(writer, fault, anthropic)
        problem = self._auth_problem(headers, anthropic)
        if problem is not None:
            return await self._send_error(writer, Fault.error(problem[0], problem[1]), anthropic)
        if method == "GET" and path == "/v1/models":
            answer: Any = {"object": "list", "data": [{"id": self.model, "object": "model",
                                                       "created": CREATED, "owned_by": "mock"}]}
        elif method == "POST" and path == "/v1/embeddings":
            answer = self._embeddings(body)
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions", "/v1/messages"):
            if body.get("continue_final_message") and not self.prefill:
                return await self._send_error(writer, Fault.error(
                    400, "Unrecognized request argument supplied: continue_final_message"), anthropic)
            answer = self._generate(path, body)
        else:
            return await self._send_error(writer, Fault.error(404, f"no route {method} {path}"), anthropic)
        if isinstance(answer, list):
            return await self._send_stream(writer, answer, fault, anthropic)
        return await self._send(writer, 200, answer, fault)

    def _control(self, body: dict) -> dict:
        if body.get("clear"):
            self.clear_faults()
        self.inject(*(Fault(**f) for f in body.get("inject", ())))
        if body.get("persistent"):
            self.set_persistent(Fault(**body["persistent"]), body.get("duration"))
        return {"requests": self._count, "queued": len(self._faults)}

    def _auth_problem(self, headers: dict[str, str], anthropic: bool) -> tuple[int, str] | None:
        if anthropic:
            if "anthropic-version" not in headers:
                return 400, "anthropic-version: header is required"
            if "x-api-key" not in headers or (self.api_key and headers["x-api-key"] != self.api_key):
                return 401, "invalid x-api-key"
        elif self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, "Incorrect API key provided"
        return None

    # --- answers --------------------------------------------------------------------------------

    def _generate(self, path: str, body: dict) -> dict | list[bytes]:
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        start = _prefilled_words(path, body)  # a continuation goes on where its prefill ends
        words = [WORDS[(start + i) % len(WORDS)] for i in range(limit or self.reply_words)]
        stop = body.get("stop_sequences") or body.get("stop") or ()
        stop = {stop} if isinstance(stop, str) else set(stop)
        cut_at = next((i for i, w in enumerate(words) if w in stop), None)
        if cut_at is not None:
            words = words[:cut_at]
        if path == "/v1/messages":
            prompt = _text(body.get("system")) + " " + _text(body.get("messages"))
            reason = "stop_sequence" if cut_at is not None else "max_tokens" if limit else "end_turn"
            return _anthropic_answer(self.model, words, reason, len(prompt.split()), body.get("stream"), bool(start))
        chat = path == "/v1/chat/completions"
        prompt = _text(body.get("messages") if chat else body.get("prompt"))
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                 "total_tokens": len(prompt.split()) + len(words)}
        reason = "length" if limit and cut_at is None else "stop"
        base = {"id": f"cmpl-mock{self._count}", "created": CREATED, "model": self.model}
        if not body.get("stream"):
            text = (" " if start else "") + " ".join(words)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else \
                {"index": 0, "text": text}
            return {**base, "object": "chat.completion" if chat else "text_completion",
                    "choices": [{**choice, "finish_reason": reason}], "usage": usage}
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict, finish: str | None) -> dict:
            part = {"delta": delta} if chat else {"text": delta.get("content", "")}
            return {**base, "object": obj, "choices": [{"index": 0, **part, "finish_reason": finish}]}

        chunks = [chunk({"role": "assistant", "content": w if i == 0 and not start else " " + w}
                        if i == 0 else {"content": " " + w}, None) for i, w in enumerate(words)]
        chunks.append(chunk({}, reason))
        if self.honour_include_usage and (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**base, "object": obj, "choices": [], "usage": usage})
        return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]

    def _embeddings(self, body: dict) -> dict:
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else inputs
        dims = body.get("dimensions") or 8
        data = [{"object": "embedding", "index": i, "embedding": _vector(item, dims)}
                for i, item in enumerate(inputs or [])]
        tokens = sum(len(item) if isinstance(item, list) else len(str(item).split()) for item in inputs or [])
        return {"object": "list", "data": data, "model": self.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # --- the wire ---------------------------------------------------------------------------------

    def _error_body(self, fault: Fault, anthropic: bool) -> tuple[int, Any]:
        status, message, code, anthropic_message = _REFUSALS.get(
            fault.kind, (fault.status, fault.message, None, fault.message))
        if fault.raw_body is not None:
            return status, fault.raw_body
        if anthropic:
            return status, {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"),
                                                       "message": anthropic_message}}
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        return status, {"error": {"message": message, "type": kind, "param": None, "code": code}}

    async def _send_error(self, writer: asyncio.StreamWriter, fault: Fault, anthropic: bool) -> bool:
        extra = [(name, value) for name, value in (("retry-after", fault.retry_after),
                                                   ("retry-after-ms", fault.retry_after_ms)) if value]
        return await self._send(writer, *self._error_body(fault, anthropic), extra=extra)

    async def _send(self, writer: asyncio.StreamWriter, status: int, answer: Any, fault: Fault | None = None,
                    extra: Sequence[tuple[str, str]] = ()) -> bool:
        if fault is not None and fault.kind == "slow_first_token" and not fault.before_headers:
            await asyncio.sleep(fault.delay)
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        ctype = "text/html" if isinstance(answer, str) else "application/json"
        if fault is not None and fault.kind in ("cut", "stall", "malformed"):
            data, declared = data[:len(data) // 2], len(data) if fault.kind != "malformed" else len(data) // 2
        else:
            declared = len(data)
        writer.write(_head(status, ctype, [("content-length", str(declared)), *extra]) + data)
        await writer.drain()
        if fault is not None and fault.kind == "stall":
            await asyncio.get_running_loop().create_future()
        return fault is None or fault.kind != "cut"

    async def _send_stream(self, writer: asyncio.StreamWriter, events: list[bytes], fault: Fault | None,
                           anthropic: bool) -> bool:
        kind = fault.kind if fault is not None else None
        if kind == "no_done":
            events = events[:-1]
        writer.write(_head(200, "text/event-stream", [("transfer-encoding", "chunked")]))
        for i, event in enumerate(events):
            if kind == "slow_first_token" and i == 0 and not fault.before_headers:
                await writer.drain()
                await asyncio.sleep(fault.delay)
            elif self.chunk_interval and i:
                await writer.drain()
                await asyncio.sleep(self.chunk_interval)
            if i == 1 and not self._gate.is_set():
                await writer.drain()
                self.held += 1
                try:
                    await self._gate.wait()
                finally:
                    self.held -= 1
            if fault is not None and i == fault.after:
                if kind == "cut":
                    await writer.drain()
                    return False
                if kind == "stall":
                    await writer.drain()
                    await asyncio.get_running_loop().create_future()
                if kind == "malformed":
                    event = event[:event.index(b"data: ") + 6] + b'{"choices": [{"delta": \n\n'
                if kind == "error_event":
                    status, error = self._error_body(fault, anthropic)
                    if not anthropic:  # vLLM puts the HTTP status in `code`
                        error["error"]["code"] = status
                    event = (b"event: error\n" if anthropic else b"") + b"data: %s\n\n" % json.dumps(error).encode()
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            if kind == "error_event" and i == fault.after:
                break  # the body ends after the error, as the APIs do
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    """(method, path, lower-case headers, body) of the next request; None when it is not HTTP."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    try:
        method, target, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
    except ValueError:
        return None
    return method, target.split("?", 1)[0], headers, await reader.readexactly(length)


def _head(status: int, ctype: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"content-type: {ctype}",
             *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _text(value: Any) -> str:
    """The text in a prompt, message list, content-part list or system blocks."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text(item) for item in value)
    if isinstance(value, dict):
        return _text(value.get("content", value.get("text")))
    return ""


def _vector(item: Any, dims: int) -> list[float]:
    seed, out = json.dumps(item).encode(), []
    while len(out) < dims:
        seed = hashlib.sha256(seed).digest()
        out.extend(b / 127.5 - 1.0 for b in seed)
    norm = sum(x * x for x in out[:dims]) ** 0.5 or 1.0
    return [x / norm for x in out[:dims]]


def _prefilled_words(path: str, body: dict) -> int:
    """The words of the answer a request's final assistant message already holds (0: a new answer)."""
    messages = body.get("messages") or []
    continues = path == "/v1/messages" or body.get("continue_final_message")
    if not continues or not messages or messages[-1].get("role") != "assistant":
        return 0
    return len(_text(messages[-1]).split())


def _anthropic_answer(model: str, words: list[str], reason: str, prompt_tokens: int,
                      stream: bool, continued: bool = False) -> dict | list[bytes]:
    usage = {"input_tokens": prompt_tokens, "output_tokens": len(words), "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0}
    message = {"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": (" " if continued else "") + " ".join(words)}],
               "stop_reason": reason,
               "stop_sequence": None, "usage": usage}
    if not stream:
        return message
    events = [{"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                                    "usage": {**usage, "output_tokens": 1}}},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "ping"},
              *({"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": w if i == 0 and not continued else " " + w}}
                for i, w in enumerate(words)),
              {"type": "content_block_stop", "index": 0},
              {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None},
               "usage": {"output_tokens": len(words)}},
              {"type": "message_stop"}]
    return [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the mock LLM upstream in the foreground.")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--model", default="mock-model")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--chunk-interval", type=float, default=0.0, help="seconds between streamed events")
    parser.add_argument("--record", action="store_true", help="keep every request in memory")
    args = parser.parse_args()
    mock = MockUpstream(model=args.model, latency=args.latency, chunk_interval=args.chunk_interval,
                        record=args.record, port=args.port).start()
    print(f"mock upstream on {mock.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        mock.stop()


if __name__ == "__main__":
    main()
