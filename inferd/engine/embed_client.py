"""`AsyncEmbedder`: the API process's handle on an embedding model in its own process.

`start()` spawns `embed_process.run_embed_core`, binds two ZMQ ipc sockets in a
private temp dir (PUSH to the core, PULL from it) and waits for `Ready`, which
carries the model's `EmbedSpec`. Requests are tokenized and validated here, off
the model's loop (a too long input or a size the model cannot return fails that
request alone, with `InvalidParameterError`), then sent to the core at once; the
core batches whatever is pending and answers each request with its vectors.
Cutting to `dimensions` also happens here, so requests that differ only in it
share a batch.

Failure is explicit, as in `AsyncEngine`: if the process exits (a watcher thread
waits on its sentinel) or reports `Fatal`, every pending request fails with
`EngineDeadError`, `is_healthy` turns False, and new requests fail at once. More
than `max_pending_requests` in flight turns into `EngineOverloadedError`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import tempfile
import threading
import time

import msgspec
import numpy as np
import zmq
import zmq.asyncio

from inferd.engine import embed_process as ep
from inferd.engine.async_client import EngineDeadError, EngineOverloadedError, RequestAbortedError
from inferd.engine.core_process import StartupFailed
from inferd.engine.embed_spec import EmbedConfig, EmbedSpec
from inferd.engine.embed_tokenizer import EmbedInputs, EmbedTokenizer
from inferd.engine.embedder import EmbedResult
from inferd.models.default_embedding_model import resolve_embedding_model

log = logging.getLogger(__name__)


class AsyncEmbedder:
    def __init__(self, config: EmbedConfig):
        self.config = config
        self.spec: EmbedSpec | None = None  # the model's facts, once started
        self.tokenizer: EmbedTokenizer | None = None
        self.stats = ep.EmbedStats()
        self.dead_reason: str | None = None
        self._closing = False
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ep.FromCore)
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._push = self._pull = self._ctx = self._actx = self._tmpdir = self._out_task = None
        self._exited: asyncio.Event | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, timeout: float = 300.0) -> AsyncEmbedder:
        """Spawn the embedding process and wait until it has loaded the model."""
        resolve_embedding_model(self.config.model)  # a wrong path fails here, before a process starts
        self._loop = asyncio.get_running_loop()
        self._tmpdir = tempfile.mkdtemp(prefix="inferd-embed-")
        to_core, from_core = f"ipc://{self._tmpdir}/in", f"ipc://{self._tmpdir}/out"
        # sends are sync and NOBLOCK (no high-water mark: they fail only without a peer);
        # receives are awaited on the event loop
        self._ctx, self._actx = zmq.Context(), zmq.asyncio.Context()
        self._push, self._pull = self._ctx.socket(zmq.PUSH), self._actx.socket(zmq.PULL)
        self._push.sndhwm = self._push.linger = self._pull.linger = 0
        self._push.bind(to_core)
        self._pull.bind(from_core)
        self._proc = multiprocessing.get_context("spawn").Process(
            target=ep.run_embed_core, name="inferd-embed-core", daemon=True,
            args=(self.config, to_core, from_core, os.getpid(), logging.getLogger().getEffectiveLevel()))
        self._proc.start()
        self._exited = asyncio.Event()
        threading.Thread(target=self._watch, args=(self._proc,), daemon=True,
                         name="inferd-embed-watch").start()
        try:
            ready = await self._wait_ready(timeout)
        except BaseException:
            await self.shutdown()
            raise
        self.spec = ready.spec
        self.tokenizer = EmbedTokenizer(ready.spec)
        self._out_task = asyncio.create_task(self._output_loop(), name="inferd-embed-outputs")
        return self

    async def _wait_ready(self, timeout: float) -> ep.Ready:
        deadline = time.monotonic() + timeout
        while not await self._pull.poll(200):
            if self._exited.is_set():
                raise RuntimeError(f"embedding process exited during startup (exit code {self._proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"embedding process did not start within {timeout:.0f}s")
        msg = self._decoder.decode(await self._pull.recv())
        if isinstance(msg, StartupFailed):
            raise ValueError(f"embedding model failed to load: {msg.error}")
        assert isinstance(msg, ep.Ready), msg
        return msg

    def _watch(self, proc) -> None:
        # only wait on the sentinel here: reaping (exitcode) stays on the loop thread
        multiprocessing.connection.wait([proc.sentinel])
        try:
            self._loop.call_soon_threadsafe(self._on_core_exit)
        except RuntimeError:
            pass  # the event loop is already closed: we are exiting anyway

    def _on_core_exit(self) -> None:
        self._exited.set()
        if not self._closing:
            self._mark_dead(f"the embedding process exited unexpectedly (exit code {self._proc.exitcode})")

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:
            log.error("embedder is dead: %s", reason)
            self.dead_reason = reason
        self._fail_all(EngineDeadError(self.dead_reason))

    def _fail_all(self, error: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)

    @property
    def is_healthy(self) -> bool:
        return self.spec is not None and self.dead_reason is None and not self._closing

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the process (politely, then by force) and release the sockets."""
        if self._closing:
            return
        self._closing = True
        self._fail_all(RequestAbortedError("the server is shutting down; the request was aborted"))
        proc = self._proc
        if proc is not None and not self._exited.is_set():
            self._send(ep.Shutdown())
            if not await self._wait_exit(timeout):
                log.warning("embedding process did not stop in %.0fs; terminating it", timeout)
                proc.terminate()
                if not await self._wait_exit(2.0):
                    proc.kill()
                    await self._wait_exit(2.0)
            proc.join(0)  # reap it
        if self._out_task is not None:
            self._out_task.cancel()
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
        for ctx in (self._ctx, self._actx):
            if ctx is not None:
                ctx.term()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def _wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _send(self, msg) -> bool:
        try:
            self._push.send(self._encoder.encode(msg), zmq.NOBLOCK)
            return True
        except (zmq.Again, zmq.ZMQError):
            return False

    # -- model facts ----------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.spec.model_name

    @property
    def dimension(self) -> int:
        return self.spec.dimension

    @property
    def max_len(self) -> int:
        return self.spec.max_len

    # -- requests -------------------------------------------------------------------------

    def check_accepting(self) -> None:
        """Raise the error a new request would get now, if any."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if self._closing or self.spec is None:
            raise RequestAbortedError("the server is shutting down; no new requests are accepted")
        if len(self._pending) >= self.config.max_pending_requests:
            raise EngineOverloadedError(
                f"the embedding model is overloaded ({len(self._pending)} requests in flight, "
                f"limit {self.config.max_pending_requests}); retry later", 1)

    async def embed(self, inputs: EmbedInputs, *, truncate: bool = False,
                    dimensions: int | None = None) -> EmbedResult:
        """Embed texts or token id lists, batched with whatever else is pending.

        InvalidParameterError (param "input" or "dimensions") for a bad request;
        EngineDeadError once the process is gone; EngineOverloadedError when full."""
        self.check_accepting()
        self.spec.check_dimensions(dimensions)
        ids = self.tokenizer.encode(inputs, truncate)
        rid = next(self._ids)
        fut = self._pending[rid] = self._loop.create_future()
        if not self._send(ep.EmbedRequest(rid, ids)):
            self._pending.pop(rid, None)
            self._mark_dead("the embedding process is not reachable")
            raise EngineDeadError(self.dead_reason)
        try:
            raw = await fut
        finally:
            self._pending.pop(rid, None)  # cancelled: the reply, when it comes, is dropped
        vectors = np.frombuffer(raw, dtype=np.float32).reshape(len(ids), self.spec.dimension)
        return EmbedResult(self.spec.apply_dimensions(vectors.copy(), dimensions), ids)

    async def _output_loop(self) -> None:
        try:
            while True:
                msg = self._decoder.decode(await self._pull.recv())
                if isinstance(msg, ep.Embeddings):
                    self.stats = msg.stats
                    fut = self._pending.pop(msg.request_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.vectors)
                elif isinstance(msg, ep.Fatal):
                    self._mark_dead(f"the embedding process failed: {msg.error.strip().splitlines()[-1]}")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken loop would hang every request
            log.exception("embedding output loop failed")
            self._mark_dead(f"the embedding output loop failed: {e}")
            if self._proc is not None and not self._exited.is_set():
                self._proc.kill()
