"""The dynamic batcher: concurrent requests to one model run as one ONNX Runtime call.

Triton's two knobs: `max_batch_size` (rows in one run; 0 turns batching off) and
`max_queue_delay_microseconds` (how long the oldest queued request may wait for others to join
it; 0: take what is queued now). Requests queue in arrival order; the loop takes as many whole
requests as fit in `max_batch_size` rows, concatenates their inputs along the batch dimension,
runs them on the model's own thread (one run at a time per model, off the event loop, the GIL
released inside ONNX Runtime) and hands each request its slice of the outputs. While a run is in
flight new requests queue, so under load batches form even without a delay. If a run of several
requests fails, each is run alone, so one request's failure is its own. Every run is reported
to `on_batch` as a `BatchRecord` (rows, requests, each one's queue time, compute time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRecord:
    rows: int
    requests: int
    queue_s: tuple[float, ...]  # per request: arrival until its run started
    compute_s: float


@dataclass
class _Pending:
    feeds: Arrays
    rows: int
    future: asyncio.Future
    arrival: float


class BatcherClosed(RuntimeError):
    pass


class DynamicBatcher:
    def __init__(self, run: Callable[[Arrays], Arrays], *, max_batch_size: int, max_queue_delay_s: float = 0.0,
                 batchable: bool = True, name: str = "model", on_batch: Callable[[BatchRecord], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self._run_fn = run
        self.max_batch_size = max_batch_size if batchable else 0
        self.max_queue_delay_s = max_queue_delay_s
        self.on_batch = on_batch
        self.clock = clock
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"onnx-{name}")
        self._wake = asyncio.Event()
        self._full: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self.closed = False
        self.num_requests = self.num_batches = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self.closed

    async def submit(self, feeds: Arrays, rows: int) -> Arrays:
        """The model's outputs for these inputs (`rows` along the batch dimension)."""
        if self.closed:
            raise BatcherClosed("the model is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(feeds, rows, future, self.clock()))
        self._queued_rows += rows
        self.num_requests += 1
        if self._full is not None and not self._full.done() and self._queued_rows >= self.max_batch_size:
            self._full.set_result(None)
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            if not self._queue:
                self._wake.clear()
                continue
            await self._gather()
            batch = self._take()
            if not self._queue:
                self._wake.clear()
            if batch:
                try:
                    await self._run(batch)
                except Exception as e:  # noqa: BLE001 - a bug here must fail its batch, not stop the loop
                    log.exception("the batcher failed a batch of %d requests", len(batch))
                    for p in batch:
                        _settle(p.future, error=e)

    async def _gather(self) -> None:
        """Wait, at most until the oldest request has waited max_queue_delay, for a full batch."""
        if self.max_batch_size <= 0 or self.max_queue_delay_s <= 0 or self._queued_rows >= self.max_batch_size:
            return
        remaining = self._queue[0].arrival + self.max_queue_delay_s - self.clock()
        if remaining > 0:
            self._full = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._full], timeout=remaining)
            self._full = None

    def _take(self) -> list[_Pending]:
        batch, rows = [], 0
        while self._queue:
            p = self._queue[0]
            if batch and (self.max_batch_size <= 0 or rows + p.rows > self.max_batch_size):
                break
            self._queue.popleft()
            self._queued_rows -= p.rows
            if not p.future.done():  # a client that left is not run
                batch.append(p)
                rows += p.rows
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = self.clock()
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_fn, feeds)
        except Exception as e:  # noqa: BLE001 - handed to the requests that asked
            if len(batch) == 1:
                _settle(batch[0].future, error=e)
            else:  # run each alone: the failure belongs to whichever request caused it
                for p in batch:
                    await self._run([p])
            return
        compute = self.clock() - started
        self.num_batches += 1
        offset = 0
        for p in batch:
            if len(batch) == 1:
                _settle(p.future, outputs)
            else:
                _settle(p.future, {k: v[offset:offset + p.rows] for k, v in outputs.items()})
            offset += p.rows
        if self.on_batch is not None:
            self.on_batch(BatchRecord(offset, len(batch), tuple(started - p.arrival for p in batch), compute))

    async def aclose(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            _settle(self._queue.popleft().future, error=BatcherClosed("the model is shutting down"))
        self._executor.shutdown(wait=False)


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
