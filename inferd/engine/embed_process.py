"""The embedding model in its own process, batching requests dynamically.

The API process (engine/embed_client.py) spawns `run_embed_core` with two ZMQ
ipc addresses, as the generation core is run (engine/core_process.py): it PUSHes
`EmbedRequest`s (already tokenized and validated on its side) and `Shutdown`, and
PULLs what comes back. Messages are msgspec structs encoded as msgpack.

The core loads the model once, replies `Ready` with the `EmbedSpec` (tokenizer and
limits, so the API side validates without the weights), then loops: block until
a request arrives, take everything queued, wait up to `max_wait_ms` for more while
the batch holds fewer than `max_batch_tokens` tokens, embed the batch in one call
(the embedder splits it into length-sorted padded forward passes) and send one
`Embeddings` reply per request with the running `EmbedStats`. Requests beyond the
token goal stay queued for the next batch, in arrival order. An exception in a
batch is fatal, as in the generation core: inputs are checked before they get
here, so it means a broken state; the core sends `Fatal` and exits. It also exits
when its parent process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from collections import deque

import msgspec
import numpy as np
import zmq

from inferd.engine.core_process import HEARTBEAT_S, StartupFailed
from inferd.engine.embed_spec import EmbedConfig, EmbedSpec

log = logging.getLogger(__name__)


# -- API process -> core ------------------------------------------------------------------

class EmbedRequest(msgspec.Struct, tag="embed", array_like=True):
    request_id: int
    token_ids: list[list[int]]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


ToCore = EmbedRequest | Shutdown


# -- core -> API process ------------------------------------------------------------------

class EmbedStats(msgspec.Struct, array_like=True):
    """Counters since start. A batch is one dynamic batch of requests; each is
    computed in one or more forward passes (padded sub-batches)."""

    num_requests: int = 0
    num_batches: int = 0
    num_inputs: int = 0
    num_tokens: int = 0
    num_forward_passes: int = 0

    @property
    def mean_batch_size(self) -> float:
        """Requests per dynamic batch."""
        return self.num_requests / self.num_batches if self.num_batches else 0.0


class Ready(msgspec.Struct, tag="ready", array_like=True):
    spec: EmbedSpec
    pid: int


class Embeddings(msgspec.Struct, tag="embeddings", array_like=True):
    request_id: int
    vectors: bytes       # float32, row-major [inputs, spec.dimension]
    stats: EmbedStats


class Fatal(msgspec.Struct, tag="fatal", array_like=True):
    error: str


# StartupFailed is the generation core's message: the same meaning, one definition
FromCore = Ready | StartupFailed | Embeddings | Fatal


# -- the loop -----------------------------------------------------------------------------

def run_embed_core(config: EmbedConfig, input_addr: str, output_addr: str, parent_pid: int,
                   log_level: int = logging.INFO) -> None:
    """Process entry point (spawn target)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[embed]: %(message)s")
    # Ctrl-C reaches the whole process group; the API process shuts us down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.LINGER, 2000)
    outbox.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    try:
        from inferd.engine.embedder import Embedder
        embedder = Embedder(config)
    except Exception as e:  # noqa: BLE001 - reported to the API process, which exits cleanly
        if isinstance(e, (ValueError, OSError)):
            log.error("embedding model failed to load: %s", e)  # a bad model argument: no traceback
        else:
            log.exception("embedding model failed to load")
        outbox.send(encoder.encode(StartupFailed(f"{type(e).__name__}: {e}")))
        inbox.close(linger=0)
        outbox.close()
        ctx.term()
        return
    try:
        _EmbedLoop(embedder, config, inbox, outbox, encoder, parent_pid).run()
    finally:
        inbox.close(linger=0)
        outbox.close()
        ctx.term()


class _EmbedLoop:
    def __init__(self, embedder, config: EmbedConfig, inbox: zmq.Socket, outbox: zmq.Socket,
                 encoder: msgspec.msgpack.Encoder, parent_pid: int):
        self.embedder = embedder
        self.max_batch_tokens = config.max_batch_tokens
        self.max_wait_s = config.max_wait_ms / 1000
        self.inbox, self.outbox, self.encoder = inbox, outbox, encoder
        self.decoder = msgspec.msgpack.Decoder(ToCore)
        self.parent_pid = parent_pid
        self.queue: deque[EmbedRequest] = deque()
        self.queued_tokens = 0
        self.stats = EmbedStats()
        self.running = True

    def send(self, msg) -> None:
        self.outbox.send(self.encoder.encode(msg), copy=False)

    def run(self) -> None:
        self.send(Ready(self.embedder.spec, os.getpid()))
        while self.running:
            if not self.queue:
                if self.inbox.poll(int(HEARTBEAT_S * 1000)):
                    self.drain_inbox()
                if os.getppid() != self.parent_pid:
                    break
                continue
            self.wait_for_more()
            if self.running:
                self.run_batch(self.take_batch())

    def drain_inbox(self) -> None:
        while self.running:
            try:
                raw = self.inbox.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = self.decoder.decode(raw.buffer)
            if isinstance(msg, EmbedRequest):
                self.queue.append(msg)
                self.queued_tokens += sum(map(len, msg.token_ids))
            else:
                self.running = False

    def wait_for_more(self) -> None:
        """Give requests arriving just after the first `max_wait_ms` to join its batch."""
        self.drain_inbox()
        deadline = time.monotonic() + self.max_wait_s
        while self.running and self.queued_tokens < self.max_batch_tokens:
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0 or not self.inbox.poll(max(1, round(left_ms))):
                return
            self.drain_inbox()

    def take_batch(self) -> list[EmbedRequest]:
        """Requests in arrival order up to the token goal; always at least one."""
        batch, tokens = [], 0
        while self.queue:
            size = sum(map(len, self.queue[0].token_ids))
            if batch and tokens + size > self.max_batch_tokens:
                break
            batch.append(self.queue.popleft())
            tokens += size
        self.queued_tokens -= tokens
        return batch

    def run_batch(self, batch: list[EmbedRequest]) -> None:
        seqs = [ids for req in batch for ids in req.token_ids]
        passes = self.embedder.num_forward_passes
        try:
            vectors = self.embedder.embed_ids(seqs)
        except Exception:  # noqa: BLE001 - state is unknown now: report and exit
            err = traceback.format_exc()
            log.error("embedding batch failed:\n%s", err)
            self.send(Fatal(err))
            self.running = False
            return
        s = self.stats
        s.num_requests += len(batch)
        s.num_batches += 1
        s.num_inputs += len(seqs)
        s.num_tokens += sum(map(len, seqs))
        s.num_forward_passes += self.embedder.num_forward_passes - passes
        row = 0
        for req in batch:
            rows = vectors[row:row + len(req.token_ids)]
            row += len(req.token_ids)
            self.send(Embeddings(req.request_id, np.ascontiguousarray(rows).tobytes(), s))
