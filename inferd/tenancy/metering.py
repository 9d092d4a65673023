"""Metering one request from admission to its ledger row.

`Metering.begin` estimates the request's worst case (tokens, and cost at the
dearest deployment that could answer), admits it against the key's and team's
limits (`quota.admit`, in the store) and returns a `RequestMeter`. The route
feeds the meter what the client is given: the usage of a whole answer (for a
tensor model, its count of `predictions`), or the
chunks of a stream (the last usage seen in them; for a stream that ends
without one, because the client left, the content chunks are counted and the
row is marked estimated). `finish` prices the usage at the deployment that
answered and settles it, once, whatever way the request ended: the
reservation is released, the real cost booked and the ledger row written. A
request with limits settles at once, so the next one sees its refund; the rows
of requests without limits are written in batches, one transaction per
`flush_interval_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from inferd.gateway.router import Route
from inferd.store.base import Store
from inferd.tenancy import estimate, quota
from inferd.tenancy.keys import Principal
from inferd.tenancy.ledger import LedgerRow
from inferd.tenancy.prices import PriceBook
from inferd.wire.request import InferenceRequest

log = logging.getLogger(__name__)

_FLUSH_MAX = 500      # rows per settling transaction
_QUEUE_MAX = 100_000  # rows kept while the store is unreachable


class Metering:
    def __init__(self, store: Store, prices: PriceBook, max_output: dict[str, int] | None = None,
                 clock: Callable[[], float] = time.time, flush_interval_s: float = 0.05,
                 retry_interval_s: float = 1.0):
        self.store, self.prices = store, prices
        self.max_output = max_output or {}
        self.clock = clock
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self._settled: list[tuple[quota.Ticket, LedgerRow, float]] = []
        self._flusher: asyncio.Task | None = None

    async def settle_now(self, ticket: quota.Ticket, row: LedgerRow) -> None:
        settled = [(ticket, row, self.clock())]
        try:
            await self.store.run(lambda tx: quota.settle(tx, settled))
        except Exception:  # noqa: BLE001 - the client has its answer; the flusher writes it
            log.exception("could not settle request %s now; will retry", row.request_id)
            self._queue(settled)

    def settle_soon(self, ticket: quota.Ticket, row: LedgerRow) -> None:
        """Queue a finished request that holds no limits (only its ledger row is left to write);
        requests ending within `flush_interval_s` are written in one transaction, because one
        transaction per request would cost more than the request itself at a few hundred a second."""
        self._queue([(ticket, row, self.clock())])

    def _queue(self, settled: list[tuple[quota.Ticket, LedgerRow, float]]) -> None:
        """Add to the rows waiting to be written, keep at most _QUEUE_MAX (the newest), and make sure
        a flush is coming."""
        self._settled.extend(settled)
        if len(self._settled) > _QUEUE_MAX:
            dropped = len(self._settled) - _QUEUE_MAX
            log.error("the store has been unwritable for long: %d ledger rows dropped (oldest first)", dropped)
            self._settled = self._settled[dropped:]
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_interval_s)
        while not await self.flush():  # the store is down: try again later, not only on the next request
            await asyncio.sleep(self.retry_interval_s)

    async def flush(self) -> bool:
        """Settle everything queued so far (before reading the ledger, and at shutdown); False if the
        store could not be written, the rows kept for the next try."""
        while self._settled:
            batch, self._settled = self._settled[:_FLUSH_MAX], self._settled[_FLUSH_MAX:]
            try:
                await self.store.run(lambda tx: quota.settle(tx, batch))
            except Exception:  # noqa: BLE001 - one bad row must not hold back the others: try them one by one
                log.warning("could not write %d ledger rows at once; writing them one by one", len(batch))
                for i, one in enumerate(batch):
                    if not await self._settle_alone(one):
                        self._settled = [*batch[i:], *self._settled]
                        return False
        return True

    async def _settle_alone(self, settled: tuple[quota.Ticket, LedgerRow, float]) -> bool:
        """Write one row; if the store rejects it, write it with the offending fields cleared. False
        only when even that fails (the store itself is the problem)."""
        ticket, row, now = settled
        try:
            await self.store.run(lambda tx: quota.settle(tx, [settled]))
            return True
        except Exception:  # noqa: BLE001
            clean, bad = row.cleared()
            if not bad:
                log.exception("could not write the ledger row of request %s; will retry", row.request_id)
                return False
            log.error("the store rejected the ledger row of request %s; writing it with %s cleared",
                      clean.request_id or row.id, ", ".join(bad))
        try:
            await self.store.run(lambda tx: quota.settle(tx, [(ticket, clean, now)]))
            return True
        except Exception:  # noqa: BLE001
            log.exception("could not write the cleared ledger row %s; will retry", row.id)
            return False

    async def begin(self, request: InferenceRequest, group: str) -> RequestMeter:
        """Admit a request to `group` (QuotaExceeded if a limit refuses it) and start its meter."""
        prompt = estimate.prompt_bound(request)
        output = estimate.output_bound(request, self.max_output.get(group, estimate.DEFAULT_MAX_OUTPUT))
        worst = self.prices.worst(group).cost(prompt, 0, output, batch=request.batch_id is not None)
        row = LedgerRow(ts=self.clock(), endpoint=request.endpoint, status=0, request_id=request.request_id,
                        stream=request.stream, model=request.model, batch_id=request.batch_id)
        return await self._admit(request.caller, row, quota.Demand(tokens=prompt + output, cost_usd=worst), prompt)

    async def begin_predictions(self, principal: Principal | None, group: str, model: str, request_id: str,
                                predictions: int, batch_id: str | None = None) -> RequestMeter:
        """The same for a tensor model's call (`infer`) that asks it to score `predictions` rows (a batch
        line's at the batch discount)."""
        worst = self.prices.worst(group).cost(0, 0, 0, predictions=predictions, batch=batch_id is not None)
        row = LedgerRow(ts=self.clock(), endpoint="infer", status=0, request_id=request_id, model=model,
                        batch_id=batch_id)
        return await self._admit(principal, row, quota.Demand(tokens=0, cost_usd=worst), 0)

    async def _admit(self, principal: Principal | None, row: LedgerRow, demand: quota.Demand,
                     prompt_estimate: int) -> RequestMeter:
        now = row.ts
        row.key_id = principal.key_id if principal else None
        row.team = principal.team if principal else None
        if principal is None or not principal.limited:  # nothing to check: no store round trip before it runs
            return RequestMeter(self, quota.Ticket("", principal, demand, now), row, prompt_estimate=prompt_estimate)
        try:
            ticket = await self.store.run(lambda tx: quota.admit(tx, principal, demand, now))
        except quota.QuotaExceeded as refusal:  # refused requests are rows too: showback counts them
            row.status = refusal.status
            self.settle_soon(quota.Ticket("", principal, demand, now), row)
            raise
        return RequestMeter(self, ticket, row, prompt_estimate=prompt_estimate)


class RequestMeter:
    """What one admitted request used; `finish` settles it exactly once."""

    def __init__(self, metering: Metering, ticket: quota.Ticket, row: LedgerRow, prompt_estimate: int):
        self.metering, self.ticket, self.row = metering, ticket, row
        self._started = time.perf_counter()
        self._prompt_estimate = prompt_estimate
        self._usage: dict | None = None
        self._content_chunks = 0
        self._finished = False

    def usage(self, usage: dict | None) -> None:
        """The usage the client was given (or, in a stream, the latest running count)."""
        if usage:
            self._usage = usage

    def chunk(self, chunk: dict) -> None:
        """A streamed chunk on its way to the client."""
        if self.row.ttft_s is None and chunk.get("choices"):
            self.row.ttft_s = time.perf_counter() - self._started
        self.usage(chunk.get("usage"))
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content") or choice.get("text"):
                self._content_chunks += 1

    async def finish(self, status: int, route: Route | None = None, *, cancelled: bool = False,
                     cache_hit: bool = False) -> LedgerRow | None:
        """Close the meter and settle it (the first call only)."""
        if self._finished:
            return None
        row = self.close(status, route, cancelled=cancelled, cache_hit=cache_hit)
        if self.ticket.scopes:  # limits to release: at once, so the next request sees them
            await self.metering.settle_now(self.ticket, row)
        else:
            self.metering.settle_soon(self.ticket, row)
        return row

    def close(self, status: int, route: Route | None = None, *, cancelled: bool = False,
              cache_hit: bool = False) -> LedgerRow:
        """The request's ledger row, priced; the caller writes it (`finish` does, or a batch line's
        transaction, which must write its result and its row together)."""
        self._finished = True
        row = self.row
        row.status, row.cancelled, row.cache_hit = status, cancelled, cache_hit
        row.latency_s = time.perf_counter() - self._started
        if route is not None:
            row.served_model, row.deployment, row.model_version = route.group, route.deployment, route.version
            row.fallback_from, row.degraded_from = route.fallback_from, route.degraded_from
        if self._usage is not None:
            row.prompt_tokens = int(self._usage.get("prompt_tokens") or 0)
            row.completion_tokens = int(self._usage.get("completion_tokens") or 0)
            details = self._usage.get("prompt_tokens_details") or {}
            row.cached_tokens = int(details.get("cached_tokens") or 0)
            thinking = self._usage.get("completion_tokens_details") or {}
            row.reasoning_tokens = int(thinking.get("reasoning_tokens") or 0)
        elif row.deployment is not None and (self._content_chunks or cancelled):
            # the deployment worked but never said how much: count what reached the client
            row.prompt_tokens = math.ceil(self._prompt_estimate / 4)
            row.completion_tokens = self._content_chunks
            row.usage_estimated = True
        row.predictions = int((self._usage or {}).get("predictions") or 0)
        if not cache_hit:
            batch = row.batch_id is not None
            parts = route.broken_parts if route is not None else []
            # a stream another deployment finished: each broken part at its own deployment's price
            prompt = row.prompt_tokens - sum(p.prompt_tokens for p in parts)
            completion = row.completion_tokens - sum(p.completion_tokens for p in parts)
            row.cost_usd = self.metering.prices.price(row.deployment).cost(
                max(0, prompt), row.cached_tokens, max(0, completion), batch=batch, predictions=row.predictions)
            for p in parts:
                row.cost_usd += self.metering.prices.price(p.deployment).cost(p.prompt_tokens, 0, p.completion_tokens,
                                                                              batch=batch)
        return row
