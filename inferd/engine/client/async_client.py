"""`AsyncEngine`: the API process's handle on an engine core running in its own process.

It mirrors `LLMEngine` across a process boundary. `start()` spawns
`core_process.run_core` through a `ProcessLink` (engine/process_link.py: two ZMQ
ipc sockets, PUSH to the core and PULL from it) and waits for `Ready`, which
carries the `TokenizerSpec` and model facts, so the weights are loaded once, in
the core. The API side owns the `Tokenizer` and the `OutputProcessor`:
detokenization, stop strings (their `to_abort` ids go back to the core as
`Abort`) and request timings happen here, off the core's hot loop, and never
block on the model.

`generate()` is an async iterator of `RequestOutput`s. Each request has a small
mailbox (`_Stream`) that merges deltas the consumer has not taken yet, so a slow
reader loses nothing. Leaving the iterator early (a client disconnect) aborts the
request in the core, which frees its KV blocks at once.

Failure is explicit: if the core process exits (the link watches its sentinel)
or reports `Fatal`, every request in flight fails with `EngineDeadError` and
`is_healthy` turns False; new requests fail at once. A bounded number of
requests in flight (`max_num_seqs + max_waiting_requests`) turns overload into
`EngineOverloadedError` with a retry hint. `EngineDeadError` and
`RequestAbortedError` are defined with the link, as the embedding client raises
them too; they are importable from here as well.

Where the core runs is the link's `host`: a process of this one by default, or a
Ray actor on any node of a cluster (providers/ray_actor.py), whose outputs come
over TCP straight to this process, as they come over ipc from a local core.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from inferd.engine import messages as ipc
from inferd.engine.client.output_processor import OutputProcessor
from inferd.engine.config import EngineConfig
from inferd.engine.core import process as cp
from inferd.engine.outputs import RequestOutput
from inferd.engine.process_link import ChildHost, EngineDeadError, ProcessLink, RequestAbortedError
from inferd.engine.sampling_params import InvalidParameterError, SamplingParams, check_context
from inferd.engine.tokenizer import Tokenizer, with_chat_template

log = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class RequestRejectedError(ValueError):
    """The core refused the request for a reason not tied to one parameter."""


@dataclass
class RequestMetrics:
    """Timings of one request (monotonic seconds), handed to `on_request_done`."""

    arrival: float
    num_prompt_tokens: int
    request_id: str = ""
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    num_generation_tokens: int = 0
    inter_token: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)

    def add_tokens(self, now: float, count: int) -> None:
        if self.first_token is None:
            self.first_token = now
        else:
            self.inter_token.append(now - self.last_token)
        self.last_token = now
        self.num_generation_tokens += count


class _Stream:
    def __init__(self, n: int, metrics: RequestMetrics):
        self.n = n
        self.metrics = metrics
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.event = asyncio.Event()
        self._reset()

    def _reset(self) -> None:
        self.text = [""] * self.n
        self.ids: list[list[int]] = [[] for _ in range(self.n)]
        self.lps: list[list] = [[] for _ in range(self.n)]

    def put(self, out: RequestOutput) -> None:
        self.latest = out
        for i, o in enumerate(out.outputs):
            self.text[i] += o.text_delta
            self.ids[i] += o.token_ids_delta
            self.lps[i] += o.logprobs_delta
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()

    async def get(self) -> RequestOutput:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        self.event.clear()
        out = self.latest
        outputs = [dataclasses.replace(o, text_delta=self.text[i], token_ids_delta=self.ids[i],
                                       logprobs_delta=self.lps[i]) for i, o in enumerate(out.outputs)]
        self._reset()
        return dataclasses.replace(out, outputs=outputs)


class AsyncEngine:
    def __init__(self, config: EngineConfig, *, max_waiting_requests: int = 256,
                 on_request_done: Callable[[RequestMetrics], None] | None = None, host: ChildHost | None = None):
        self.config = config
        self.max_waiting_requests = max_waiting_requests
        self.on_request_done = on_request_done
        self.info: ipc.CoreReady | None = None  # model facts from the core, once started
        self.tokenizer: Tokenizer | None = None
        self.stats = ipc.Stats()
        self._draining = False
        self._streams: dict[str, _Stream] = {}
        self._reused = 0  # suffixes handed out by `_unique`
        self._link = ProcessLink("engine core", "engine", ipc.FromEngineCore, on_message=self._on_message,
                                 fail_all=self._fail_all, log=log, host=host)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, timeout: float = 900.0) -> ipc.CoreReady:
        """Spawn the core and wait until it has loaded the model."""
        self.info = ready = await self._link.start(cp.run_core, self.config, ipc.CoreReady, timeout)
        self.tokenizer = Tokenizer(with_chat_template(ready.tokenizer, self.config.chat_template))
        self._processor = OutputProcessor(self.tokenizer)
        self.stats = ipc.Stats(num_free_blocks=ready.num_blocks, num_blocks=ready.num_blocks)
        self._link.listen()
        return self.info

    def _fail_all(self, error: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            self._forget(rid, "abort")
            stream.fail(error)

    @property
    def dead_reason(self) -> str | None:
        return self._link.dead_reason

    async def wait_dead(self) -> str:
        """Wait until the core is gone (it exited, failed or became unreachable); why."""
        await self._link.dead.wait()
        return self.dead_reason

    @property
    def is_healthy(self) -> bool:
        return self._link.healthy and not self._draining

    @property
    def num_requests(self) -> int:
        """Core requests (samples) in flight."""
        return sum(s.n for s in self._streams.values())

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, give those in flight `timeout` s, then abort them."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._streams:
            log.warning("aborting %d request(s) still running at shutdown", len(self._streams))
            self._fail_all(RequestAbortedError("the server is shutting down; the request was aborted"))

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the core process (politely, then by force) and release the sockets."""
        await self._link.close(timeout)

    # -- requests -------------------------------------------------------------------------

    def check_accepting(self, n: int = 1) -> None:
        """Raise the error a new request for `n` samples would get now, if any."""
        self._link.check_open(self._draining)
        limit = self.info.max_num_seqs + self.max_waiting_requests
        if self.num_requests + n > limit:
            retry = max(1, min(30, round(self.stats.waiting / max(1, self.info.max_num_seqs))))
            raise EngineOverloadedError(
                f"the server is overloaded ({self.num_requests} requests in flight, limit {limit}); "
                "retry later", retry)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       prompt_text: str | None = None, priority: int = 0,
                       images: list[ipc.ImageData] = ()) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until it finishes.

        `priority`: lower is scheduled sooner, and may preempt running requests of
        worse priority (vLLM's convention; batch work runs at 10, interactive at 0).
        `images`: a vision-language prompt's images, in the order of their tokens.
        """
        self.check_accepting(params.n)
        check_context(len(prompt_ids), params.max_tokens, self.info.max_model_len)  # before sending the ids
        request_id = self._unique(request_id)
        metrics = RequestMetrics(time.monotonic(), len(prompt_ids), request_id)
        children = self._processor.add_request(request_id, prompt_text, list(prompt_ids), params)
        stream = self._streams[request_id] = _Stream(params.n, metrics)
        if not self._link.send(ipc.AddRequest(request_id, list(prompt_ids), children, priority, list(images))):
            self._forget(request_id, None)
            self._link.mark_dead("the engine core process is not reachable")
            raise EngineDeadError(self.dead_reason)
        finished = False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def _unique(self, request_id: str) -> str:
        """`request_id`, or, while a request of that id is still in flight (a client that sends its
        own ids may reuse one), the id with a suffix: the log lines still name the client's id."""
        if request_id not in self._streams:
            return request_id
        self._reused += 1
        return f"{request_id}~{self._reused}"

    def abort(self, request_id: str) -> None:
        """Stop a request: the core frees its KV blocks; its stream ends."""
        self._forget(request_id, "abort")

    def _forget(self, request_id: str, reason: str | None) -> _Stream | None:
        """Drop a request here and in the core; `reason` set: report it as finished."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return None
        cids = self._processor.child_ids(request_id)
        if self.dead_reason is None and cids:
            self._link.send(ipc.Abort(cids))
        self._processor.abort(request_id)
        if reason is not None:
            stream.metrics.finish_reasons = [reason] * stream.n
            self._request_done(stream.metrics)
        return stream

    def _request_done(self, m: RequestMetrics) -> None:
        m.finished = time.monotonic()
        log.debug("request %s finished (%s): %d prompt tokens, %d generated, first token after %s, %.1f ms",
                  m.request_id, ",".join(m.finish_reasons), m.num_prompt_tokens, m.num_generation_tokens,
                  "-" if m.first_token is None else f"{(m.first_token - m.arrival) * 1000:.1f} ms",
                  (m.finished - m.arrival) * 1000)
        if self.on_request_done is not None:
            try:
                self.on_request_done(m)
            except Exception:  # noqa: BLE001 - metrics must never break a request
                log.exception("on_request_done failed")

    # -- what the core sends --------------------------------------------------------------

    def _on_message(self, msg) -> None:
        if isinstance(msg, ipc.Outputs):
            self.stats = msg.stats
            self._on_outputs(msg)
        elif isinstance(msg, ipc.Stats):
            self.stats = msg
        elif isinstance(msg, ipc.Rejected):
            self._on_rejected(msg)

    def _on_outputs(self, msg: ipc.Outputs) -> None:
        now = time.monotonic()
        for rid, t in msg.scheduled:
            stream = self._streams.get(rid)
            if stream is not None and stream.metrics.scheduled is None:
                stream.metrics.scheduled = t
        outputs, to_abort = self._processor.process(msg.outputs)
        if to_abort:
            self._link.send(ipc.Abort(to_abort))
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            new_tokens = sum(len(o.token_ids_delta) for o in out.outputs)
            if new_tokens:
                stream.metrics.add_tokens(now, new_tokens)
            if out.finished:
                del self._streams[out.request_id]
                stream.metrics.finish_reasons = [o.finish_reason or "abort" for o in out.outputs]
                self._request_done(stream.metrics)
            stream.put(out)

    def _on_rejected(self, msg: ipc.Rejected) -> None:
        stream = self._forget(msg.request_id, None)
        if stream is not None:
            stream.fail(InvalidParameterError(msg.param, msg.message) if msg.param
                        else RequestRejectedError(msg.message))
