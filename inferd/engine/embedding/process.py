"""The embedding model in its own process, batching requests dynamically.

The API process (engine/embedding/client.py) spawns `run_embed_core` with two ZMQ
ipc addresses, as the generation core is run (engine/core/process.py): it PUSHes
`EmbedRequest`s (already tokenized and validated on its side) and `Shutdown`, and
PULLs what comes back. Messages are msgspec structs encoded as msgpack.

The core loads the model once, replies `EmbedReady` with the `EmbedSpec` (tokenizer and
limits, so the API side validates without the weights), then loops: block until
a request arrives, take everything queued, wait up to `max_wait_ms` for more while
the batch holds fewer than `max_batch_tokens` tokens, embed the batch in one call
(the embedder splits it into length-sorted padded forward passes) and send one
`Embeddings` reply per request with the running `EmbedStats`. Requests beyond the
token goal stay queued for the next batch, in arrival order. An exception in a
batch is fatal, as in the generation core: inputs are checked before they get
here, so it means a broken state; the core sends `Fatal` and exits. It also exits
when its parent process is gone.

The process plumbing and the shared messages (`Shutdown`, `StartupFailed`,
`Fatal`) are engine/process_link.py's, as for the generation core.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

import numpy as np

from inferd.engine.embedding.spec import EmbedConfig
from inferd.engine.messages import Embeddings, EmbedReady, EmbedRequest, EmbedStats, ToEmbedder
from inferd.engine.process_link import HEARTBEAT_S, ParentLink, run_child

log = logging.getLogger(__name__)


# -- the loop -----------------------------------------------------------------------------

def run_embed_core(config: EmbedConfig, input_addr: str, output_addr: str, parent_pid: int,
                   log_level: int = logging.INFO) -> None:
    """Process entry point (spawn target)."""
    run_child(lambda link: _EmbedLoop(link, config), ToEmbedder, input_addr, output_addr, parent_pid,
              log_level, tag="embed", failed="embedding model failed to load", log=log)


class _EmbedLoop:
    def __init__(self, link: ParentLink, config: EmbedConfig):
        from inferd.engine.embedding.embedder import Embedder  # model code: needed in this process only

        self.embedder = Embedder(config)
        self.link = link
        self.max_batch_tokens = config.max_batch_tokens
        self.max_wait_s = config.max_wait_ms / 1000
        self.queue: deque[EmbedRequest] = deque()
        self.queued_tokens = 0
        self.stats = EmbedStats()
        self.running = True

    def run(self) -> None:
        self.link.send(EmbedReady(self.embedder.spec, os.getpid()))
        while self.running:
            if not self.queue:
                if self.link.poll(int(HEARTBEAT_S * 1000)):
                    self.drain_inbox()
                if not self.link.parent_alive():
                    break
                continue
            self.wait_for_more()
            if self.running:
                self.run_batch(self.take_batch())

    def drain_inbox(self) -> None:
        while self.running and (msg := self.link.receive()) is not None:
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
            if left_ms <= 0 or not self.link.poll(max(1, round(left_ms))):
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
            self.link.report_fatal("embedding batch failed")
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
            self.link.send(Embeddings(req.request_id, np.ascontiguousarray(rows).tobytes(), s))
