"""`AsyncEmbedder`: the API process's handle on an embedding model in its own process.

`start()` spawns `embed_process.run_embed_core` through a `ProcessLink`
(engine/process_link.py: two ZMQ ipc sockets, PUSH to the core and PULL from
it) and waits for `Ready`, which carries the model's `EmbedSpec`. Requests are
tokenized and validated here, off the model's loop (a too long input or a size
the model cannot return fails that request alone, with `InvalidParameterError`),
then sent to the core at once; the core batches whatever is pending and answers
each request with its vectors. Cutting to `dimensions` also happens here, so
requests that differ only in it share a batch.

Failure is explicit, as in `AsyncEngine` (the link is the same): if the process
exits or reports `Fatal`, every pending request fails with `EngineDeadError`,
`is_healthy` turns False, and new requests fail at once. More than
`max_pending_requests` in flight turns into `EngineOverloadedError`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import numpy as np

from inferd.engine import messages as ipc
from inferd.engine.client.async_client import EngineOverloadedError
from inferd.engine.embedding import process as ep
from inferd.engine.embedding.embedder import EmbedResult
from inferd.engine.embedding.spec import EmbedConfig, EmbedSpec, SpecFacts
from inferd.engine.embedding.tokenizer import EmbedInputs, EmbedTokenizer
from inferd.engine.process_link import EngineDeadError, ProcessLink
from inferd.models.default_embedding_model import resolve_embedding_model

log = logging.getLogger(__name__)


class AsyncEmbedder(SpecFacts):
    def __init__(self, config: EmbedConfig):
        self.config = config
        self.spec: EmbedSpec | None = None  # the model's facts, once started
        self.tokenizer: EmbedTokenizer | None = None
        self.stats = ipc.EmbedStats()
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._link = ProcessLink("embedding process", "embedding", ipc.FromEmbedder, on_message=self._on_message,
                                 fail_all=self._fail_all, log=log)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, timeout: float = 300.0) -> AsyncEmbedder:
        """Spawn the embedding process and wait until it has loaded the model."""
        resolve_embedding_model(self.config.model)  # a wrong path fails here, before a process starts
        ready = await self._link.start(ep.run_embed_core, self.config, ipc.EmbedReady, timeout)
        self.spec = ready.spec
        self.tokenizer = EmbedTokenizer(ready.spec)
        self._link.listen()
        return self

    def _fail_all(self, error: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)

    @property
    def _proc(self):
        # the child process (None before start): tests kill it to see requests fail fast
        return self._link.host.proc

    @property
    def dead_reason(self) -> str | None:
        return self._link.dead_reason

    @property
    def is_healthy(self) -> bool:
        return self._link.healthy

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the process (politely, then by force) and release the sockets."""
        await self._link.close(timeout)

    # -- requests -------------------------------------------------------------------------

    def check_accepting(self) -> None:
        """Raise the error a new request would get now, if any."""
        self._link.check_open()
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
        fut = self._pending[rid] = asyncio.get_running_loop().create_future()
        if not self._link.send(ipc.EmbedRequest(rid, ids)):
            self._pending.pop(rid, None)
            self._link.mark_dead("the embedding process is not reachable")
            raise EngineDeadError(self.dead_reason)
        try:
            raw = await fut
        finally:
            self._pending.pop(rid, None)  # cancelled: the reply, when it comes, is dropped
        vectors = np.frombuffer(raw, dtype=np.float32).reshape(len(ids), self.spec.dimension)
        return EmbedResult(self.spec.apply_dimensions(vectors.copy(), dimensions), ids)

    def _on_message(self, msg) -> None:
        if isinstance(msg, ipc.Embeddings):
            self.stats = msg.stats
            fut = self._pending.pop(msg.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.vectors)
