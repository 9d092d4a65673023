"""Runs batch lines in the background of every server, at low priority, exactly once.

Each server runs one `BatchRunner`. Every `poll_s` it settles batches whose
window passed or that were cancelled, finalizes batches with no line left to
run, and claims pending lines (up to `concurrency` in flight) with a lease of
`lease_s` seconds that it renews while the lines run. A line goes through the
gateway like any request, with `priority` set so local engines schedule
interactive requests first; its result, its new state and its ledger row
(priced at the batch discount, billed to the key that created the batch and
counted against its and its team's budgets, though not their rate limits: the
runner paces lines itself) are written, with the line's budget reservation
settled, in one transaction that also checks the lease is still this runner's.
So a server killed mid-batch loses only uncommitted work: after its leases
expire, any runner (the restarted server, or another replica) claims those lines
again, and no line is answered or billed twice.

A batch pins the model version each of its groups gave its first line (the
version an interactive request of the batch's key would get); its other lines
run on that version while it is loaded (an open batch keeps it loaded), and each
output line names the version that answered (`response.model_version`).

Finalizing writes the output file (answered lines, in input order) and the error
file (lines that failed, expired or were cancelled) and sets the final status:
completed, expired (the window passed first) or cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from inferd.batch.files import batch_endpoint, create_file
from inferd.batch.jobs import pin_version
from inferd.classic.tensors import TensorError, decode_request, encode_result, infer_path_params
from inferd.gateway.router import Gateway, ModelGroup
from inferd.store.base import Store, Tx
from inferd.tenancy import keys, ledger, quota
from inferd.tenancy.intake import admit
from inferd.tenancy.keys import Principal
from inferd.tenancy.metering import Metering
from inferd.wire.errors import client_error, http_error
from inferd.wire.request import InferenceRequest, parse_request

log = logging.getLogger(__name__)

BATCH_PRIORITY = 10  # after interactive requests (priority 0)


@dataclass
class Claimed:
    batch_id: str
    line: int
    custom_id: str
    body: dict
    endpoint: str
    team: str | None
    key_id: str | None


def _claim(tx: Tx, owner: str, n: int, now: float, lease_s: float) -> list[Claimed]:
    tx.lock("inferd-batch-claim")
    rows = tx.fetchall(
        "SELECT l.batch_id, l.line, l.custom_id, l.body, b.endpoint, b.team, b.key_id FROM batch_lines l "
        "JOIN batches b ON b.id = l.batch_id WHERE b.status = 'in_progress' AND b.expires_at > ? "
        "AND (l.state = 'pending' OR (l.state = 'running' AND l.lease_until < ?)) "
        f"ORDER BY b.created, l.batch_id, l.line LIMIT {int(n)}", (now, now))
    tx.executemany("UPDATE batch_lines SET state = 'running', lease_owner = ?, lease_until = ?, "
                   "attempts = attempts + 1 WHERE batch_id = ? AND line = ?",
                   [(owner, now + lease_s, r[0], r[1]) for r in rows])
    return [Claimed(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6]) for r in rows]


def _complete(tx: Tx, c: Claimed, owner: str, ok: bool, status: int, result: dict, row: ledger.LedgerRow | None,
              ticket: quota.Ticket | None, now: float) -> bool:
    """Record a line's answer and bill it, if this runner still holds its lease: its ticket is settled (the
    reservation released, the cost booked against budgets) with its ledger row, in the same transaction."""
    changed = tx.execute("UPDATE batch_lines SET state = ?, status_code = ?, result = ?, lease_owner = NULL, "
                         "lease_until = NULL WHERE batch_id = ? AND line = ? AND state = 'running' "
                         "AND lease_owner = ?",
                         ("done" if ok else "failed", status, json.dumps(result), c.batch_id, c.line, owner))
    if not changed:  # the lease ran out and another runner has (or had) the line: it bills it
        if ticket is not None and row is not None:
            quota.release(tx, ticket, row, now)
        return False
    column = "completed" if ok else "failed"
    tx.execute(f"UPDATE batches SET {column} = {column} + 1 WHERE id = ?", (c.batch_id,))
    if row is not None and ticket is not None:
        quota.settle(tx, [(ticket, row, now)])
    elif row is not None:
        ledger.insert(tx, [row])
    return True


def _renew(tx: Tx, owner: str, lines: list[tuple[str, int]], until: float) -> None:
    tx.executemany("UPDATE batch_lines SET lease_until = ? WHERE batch_id = ? AND line = ? AND lease_owner = ? "
                   "AND state = 'running'", [(until, b, n, owner) for b, n in lines])


def _line_request(endpoint: str, c: Claimed, request_id: str, who: Principal | None,
                  priority: int) -> InferenceRequest:
    """A line's typed request: an OpenAI body, or the JSON tensors of a tensor model's infer call."""
    if not endpoint.startswith("infer"):
        typed = parse_request(endpoint, c.body, request_id=request_id, caller=who, batch_id=c.batch_id)
        return typed if "priority" in c.body else typed.with_priority(priority)
    try:
        tensors = decode_request(msgspec.json.encode(c.body))
    except TensorError as e:
        raise http_error(400, str(e)) from None
    if tensors.wants_binary:
        raise http_error(400, "binary output tensors cannot be written to a JSONL output file; "
                              "leave out binary_data")
    return InferenceRequest(endpoint, tensors, c.body, request_id, who, c.batch_id,
                            model=infer_path_params(c.endpoint)["name"])


def _line_model(c: Claimed) -> str | None:
    """The model a line names, for its ledger row when it failed before it was admitted."""
    params = infer_path_params(c.endpoint)
    model = params["name"] if params is not None else c.body.get("model")
    return model if isinstance(model, str) else None


def _line_error(custom_id: str, code: str, message: str) -> dict:
    return {"id": "batch_req_" + secrets.token_hex(12), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _has_open_batches(tx: Tx) -> bool:
    return tx.fetchone("SELECT 1 FROM batches WHERE status IN ('in_progress', 'cancelling') LIMIT 1") is not None


def _settle_batches(tx: Tx, now: float) -> list[str]:
    """Expire and cancel what must be, finalize batches with nothing left to run; returns finalized ids."""
    tx.lock("inferd-batch-claim")
    tx.execute("UPDATE batch_lines SET state = 'expired' WHERE batch_id IN (SELECT id FROM batches WHERE "
               "status = 'in_progress' AND expires_at <= ?) AND (state = 'pending' OR (state = 'running' AND "
               "lease_until < ?))", (now, now))
    tx.execute("UPDATE batch_lines SET state = 'cancelled' WHERE batch_id IN (SELECT id FROM batches WHERE "
               "status = 'cancelling') AND (state = 'pending' OR (state = 'running' AND lease_until < ?))", (now,))
    ready = [r[0] for r in tx.fetchall(
        "SELECT id FROM batches b WHERE status IN ('in_progress', 'cancelling') AND NOT EXISTS (SELECT 1 FROM "
        "batch_lines l WHERE l.batch_id = b.id AND l.state IN ('pending', 'running'))")]
    for batch_id in ready:
        _finalize(tx, batch_id, now)
    return ready


def _finalize(tx: Tx, batch_id: str, now: float) -> None:
    status, team, key_id = tx.fetchone("SELECT status, team, key_id FROM batches WHERE id = ?", (batch_id,))
    outputs, errors, expired = [], [], False
    for custom_id, state, result in tx.fetchall("SELECT custom_id, state, result FROM batch_lines WHERE "
                                                "batch_id = ? ORDER BY line", (batch_id,)):
        if state == "done":
            outputs.append(result)
        elif state == "failed":
            errors.append(result)
        elif state == "expired":
            expired = True
            errors.append(json.dumps(_line_error(custom_id, "batch_expired",
                                                 "the batch's completion window ended before this request ran")))
        else:
            errors.append(json.dumps(_line_error(custom_id, "batch_cancelled",
                                                 "the batch was cancelled before this request ran")))

    def write(lines: list[str], name: str) -> str | None:
        if not lines:
            return None
        return create_file(tx, team=team, key_id=key_id, purpose="batch_output", filename=f"{batch_id}_{name}.jsonl",
                           content="\n".join(lines) + "\n", now=now).id

    final = "cancelled" if status == "cancelling" else "expired" if expired else "completed"
    stamp = {"cancelled": "cancelled_at", "expired": "expired_at", "completed": "completed_at"}[final]
    tx.execute(f"UPDATE batches SET status = ?, output_file_id = ?, error_file_id = ?, finalizing_at = ?, "
               f"{stamp} = ? WHERE id = ?", (final, write(outputs, "output"), write(errors, "error"), now, now,
                                            batch_id))


class BatchRunner:
    def __init__(self, store: Store, gateway: Gateway, metering: Metering, *, concurrency: int = 8,
                 lease_s: float = 30.0, poll_s: float = 0.25, priority: int = BATCH_PRIORITY,
                 clock: Callable[[], float] = time.time):
        self.store, self.gateway, self.metering = store, gateway, metering
        self.concurrency, self.lease_s, self.poll_s, self.priority = concurrency, lease_s, poll_s, priority
        self.clock = clock
        self.owner = "runner_" + secrets.token_hex(8)
        self._running: dict[tuple[str, int], asyncio.Task] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._renewed = 0.0
        self._pins: dict[tuple[str, str], str] = {}  # (batch, group) -> the version its lines are pinned to
        self._rng = random.Random()

    def wake(self) -> None:
        """Look for work now (a batch was created or cancelled)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; lines in flight get `timeout` seconds, then are left to their leases."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=timeout)
        for task in self._running.values():
            task.cancel()

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._tick()
            except Exception:  # noqa: BLE001 - a store hiccup must not end batch processing
                log.exception("batch runner step failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass

    async def _tick(self) -> None:
        if not self._running and not await self.store.run(_has_open_batches):
            return  # an idle server: one read per poll, no writes and no claim lock
        now = self.clock()
        finalized = await self.store.run(lambda tx: _settle_batches(tx, now))
        for batch_id in finalized:
            log.info("batch %s finalized", batch_id)
        if self._running and now - self._renewed > self.lease_s / 3:
            held, until = list(self._running), now + self.lease_s
            await self.store.run(lambda tx: _renew(tx, self.owner, held, until))
            self._renewed = now
        free = self.concurrency - len(self._running)
        if free <= 0 or self._stopping:
            return
        claimed = await self.store.run(lambda tx: _claim(tx, self.owner, free, now, self.lease_s))
        if claimed and not self._running:
            self._renewed = now
        for c in claimed:
            task = asyncio.get_running_loop().create_task(self._run_line(c))
            self._running[(c.batch_id, c.line)] = task
            task.add_done_callback(lambda _, key=(c.batch_id, c.line): self._line_done(key))

    async def _pin(self, c: Claimed, group: ModelGroup) -> str | None:
        """The version of `group` the batch's lines run on: the one its first line was given (as an
        interactive request of its key would be), recorded with the batch so every runner agrees."""
        if group.assignment.stable is None:
            return None
        key = (c.batch_id, group.name)
        if key not in self._pins:
            if len(self._pins) > 10_000:
                self._pins.clear()
            chosen = group.assignment.pick(group.name, c.key_id, self._rng)
            self._pins[key] = await self.store.run(lambda tx: pin_version(tx, c.batch_id, group.name, chosen))
        return self._pins[key]

    def _line_done(self, key: tuple[str, int]) -> None:
        self._running.pop(key, None)
        self._wake.set()  # a free slot: claim the next line now, not at the next poll

    async def _principal(self, c: Claimed) -> Principal | None:
        """Who a line is billed to: the key that created the batch, held to its and its team's budgets but
        not their rate limits (the runner paces lines itself, at low priority)."""
        if not c.key_id:
            return None
        who = await self.store.run(lambda tx: keys.principal_of_key(tx, c.key_id))
        if who is None:  # the start-up admin key: not in the store, no limits
            return Principal(key_id=c.key_id, team=c.team)
        return dataclasses.replace(who, key_limits=who.key_limits.budget_only(),
                                   team_limits=who.team_limits.budget_only())

    async def _run_line(self, c: Claimed) -> None:
        endpoint = batch_endpoint(c.endpoint)
        request_id = "batch_req_" + secrets.token_hex(12)
        try:
            who = await self._principal(c)
        except Exception:  # noqa: BLE001 - the store is unreachable: the line stays with its lease, to run again
            log.exception("batch %s line %d: could not look up its key", c.batch_id, c.line)
            return
        route, admission, refused = None, None, False
        try:
            typed = _line_request(endpoint, c, request_id, who, self.priority)
            pin = await self._pin(c, self.gateway.resolve(typed.model, typed.endpoint))
            if pin is not None:
                typed = dataclasses.replace(typed, version=pin)
            admission = await admit(self.gateway, self.metering, typed)
            route = admission.route
            if who is None:  # an open server's batch: the ledger row has no key
                admission.meter.row.team = c.team
            answer = await self.gateway.request(typed, route)
            if endpoint.startswith("infer"):  # scored rows: the protocol's JSON answer
                admission.meter.usage({"predictions": answer.rows})
                answer = msgspec.json.decode(encode_result(answer)[0])
            else:
                if "id" in answer:  # a remote provider's answer carries the upstream's own
                    answer["id"] = typed.response_id
                admission.meter.usage(answer.get("usage"))
            ok, status, payload = True, 200, answer
        except Exception as e:  # noqa: BLE001 - a failed line is a result, written to the error file
            error = client_error(e)  # a bug fails the line, not the runner
            ok, status, payload = False, error.status, error.body()
            refused = isinstance(e, quota.QuotaExceeded) and admission is None  # its row is written already
        meter = admission.meter if admission is not None else None
        ticket = meter.ticket if meter is not None else None
        row = meter.close(status, route) if meter is not None else None if refused else ledger.LedgerRow(
            ts=self.clock(), endpoint=endpoint, status=status, request_id=request_id, key_id=c.key_id, team=c.team,
            model=_line_model(c), batch_id=c.batch_id)
        now = self.clock()
        if not ok and self._stopping:
            # failed because this server is going away: leave the line to its lease, to run again, and give
            # back what it reserved (the line is billed when it runs)
            if ticket is not None and ticket.scopes:
                await self.store.run(lambda tx: quota.release(tx, ticket, row, now))
            return
        result = {"id": request_id, "custom_id": c.custom_id,
                  "response": {"status_code": status, "request_id": request_id, "body": payload}, "error": None}
        if route is not None and route.version is not None:
            result["response"]["model_version"] = route.version
        try:
            kept = await self.store.run(lambda tx: _complete(tx, c, self.owner, ok, status, result, row, ticket, now))
        except Exception:  # noqa: BLE001 - the lease will expire and the line run again
            log.exception("could not record batch %s line %d", c.batch_id, c.line)
            return
        if not kept:
            log.warning("batch %s line %d: lease lost before it was recorded; another runner has it",
                        c.batch_id, c.line)
