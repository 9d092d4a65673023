"""Batch jobs in the store: created from an uploaded file, listed, cancelled, and their lines' state.

A batch is created `in_progress` with one `batch_lines` row per request of its
input file (validated when the file was uploaded, checked against the batch's
endpoint here). The runner (batch_runner.py) claims lines, answers them and
finalizes the batch; this module holds the batch's OpenAI shape and the
operations the API needs. Statuses and timestamps are OpenAI's: validating,
in_progress, finalizing, completed, failed, expired, cancelling, cancelled.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from inferd.batch.files import file_content, owned_by, parse_batch_input
from inferd.store.base import Tx

FINAL = ("completed", "failed", "expired", "cancelled")
_WINDOW = re.compile(r"^(\d+)([smh])$")
_MAX_WINDOW_S = 7 * 86400
_TIMES = ("created", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at", "expires_at")
_COLS = ("id, endpoint, input_file_id, completion_window, metadata, status, output_file_id, error_file_id, "
         "errors, total, completed, failed, team, key_id, " + ", ".join(_TIMES))


class BatchError(ValueError):
    """A request about a batch that cannot be done: status 400, 404 or 409 and a message."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def window_seconds(window: str) -> float:
    """`24h`, `30m`, `90s`; OpenAI takes only 24h, shorter windows serve tests and small jobs."""
    m = _WINDOW.match(window or "")
    if not m:
        raise BatchError(400, f"completion_window must look like 24h, 30m or 90s, not {window!r}",
                         "completion_window")
    seconds = int(m[1]) * {"s": 1, "m": 60, "h": 3600}[m[2]]
    if not 0 < seconds <= _MAX_WINDOW_S:
        raise BatchError(400, "completion_window must be between 1 s and 7 days", "completion_window")
    return float(seconds)


@dataclass
class Batch:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict | None
    status: str
    output_file_id: str | None
    error_file_id: str | None
    errors: dict | None
    total: int
    completed: int
    failed: int
    team: str | None
    key_id: str | None
    times: dict[str, float | None]

    def to_dict(self) -> dict:
        t = {k: None if v is None else int(v) for k, v in self.times.items()}
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": self.errors,
                "input_file_id": self.input_file_id, "completion_window": self.completion_window,
                "status": self.status, "output_file_id": self.output_file_id,
                "error_file_id": self.error_file_id, "created_at": t["created"],
                **{k: t[k] for k in _TIMES if k != "created"},
                "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
                "metadata": self.metadata}


def _batch(row) -> Batch:
    (bid, endpoint, input_file_id, window, metadata, status, out, err, errors, total, completed, failed,
     team, key_id, *times) = row
    return Batch(bid, endpoint, input_file_id, window, json.loads(metadata) if metadata else None, status, out,
                 err, json.loads(errors) if errors else None, total, completed, failed, team, key_id,
                 dict(zip(_TIMES, times)))


def create_batch(tx: Tx, *, team: str | None, key_id: str | None, admin: bool, input_file_id: str,
                 endpoint: str, completion_window: str, metadata: dict | None, now: float) -> Batch:
    window = window_seconds(completion_window)
    content = file_content(tx, input_file_id, team, admin)
    if content is None:
        raise BatchError(404, f"no file has the id {input_file_id!r}", "input_file_id")
    try:
        lines = parse_batch_input(content)
    except ValueError as e:
        raise BatchError(400, f"the input file is not a valid batch: {e}", "input_file_id") from None
    for line in lines:
        if line.url != endpoint:
            raise BatchError(400, f"line {line.line} of the input file is for {line.url}, but the batch's endpoint "
                             f"is {endpoint}", "endpoint")
    bid = "batch_" + secrets.token_hex(12)
    tx.execute(f"INSERT INTO batches (id, team, key_id, endpoint, input_file_id, completion_window, metadata, "
               f"status, created, in_progress_at, expires_at, total, completed, failed) "
               f"VALUES (?, ?, ?, ?, ?, ?, ?, 'in_progress', ?, ?, ?, ?, 0, 0)",
               (bid, team, key_id, endpoint, input_file_id, completion_window,
                json.dumps(metadata) if metadata else None, now, now, now + window, len(lines)))
    tx.executemany("INSERT INTO batch_lines (batch_id, line, custom_id, body, state, attempts) "
                   "VALUES (?, ?, ?, ?, 'pending', 0)",
                   [(bid, ln.line, ln.custom_id, json.dumps(ln.body)) for ln in lines])
    return get_batch(tx, bid, team, admin=True)


def get_batch(tx: Tx, batch_id: str, team: str | None, admin: bool) -> Batch | None:
    cond, params = owned_by(team, admin)
    row = tx.fetchone(f"SELECT {_COLS} FROM batches WHERE id = ?{cond}", (batch_id, *params))
    return None if row is None else _batch(row)


def list_batches(tx: Tx, team: str | None, admin: bool, after: str | None, limit: int) -> tuple[list[Batch], bool]:
    """Newest first; `after` is the id of the last batch of the previous page."""
    cond, params = owned_by(team, admin)
    if after is not None:
        anchor = tx.fetchone(f"SELECT created, id FROM batches WHERE id = ?{cond}", (after, *params))
        if anchor is None:
            raise BatchError(400, f"after: no batch has the id {after!r}", "after")
        cond += " AND (created < ? OR (created = ? AND id < ?))"
        params = (*params, anchor[0], anchor[0], anchor[1])
    rows = tx.fetchall(f"SELECT {_COLS} FROM batches WHERE 1 = 1{cond} ORDER BY created DESC, id DESC "
                       f"LIMIT {int(limit) + 1}", params)
    return [_batch(r) for r in rows[:limit]], len(rows) > limit


def cancel_batch(tx: Tx, batch_id: str, team: str | None, admin: bool, now: float) -> Batch:
    batch = get_batch(tx, batch_id, team, admin)
    if batch is None:
        raise BatchError(404, f"no batch has the id {batch_id!r}", "batch_id")
    if batch.status in ("validating", "in_progress"):
        tx.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ?", (now, batch_id))
        return get_batch(tx, batch_id, team, admin)
    if batch.status in ("cancelling", "cancelled"):
        return batch
    raise BatchError(409, f"the batch is {batch.status} and cannot be cancelled", "batch_id")


def pinned_versions(tx: Tx) -> set[tuple[str, str]]:
    """The (model group, version) pairs open batches are pinned to: kept loaded until they end."""
    out = set()
    for (pins,) in tx.fetchall("SELECT pinned_versions FROM batches WHERE status IN ('in_progress', 'cancelling') "
                               "AND pinned_versions IS NOT NULL"):
        out.update(json.loads(pins).items())
    return out


def pin_version(tx: Tx, batch_id: str, group: str, label: str) -> str:
    """Pin the batch's lines for `group` to `label`, unless a line pinned them first; returns the pin."""
    tx.lock(f"inferd-batch-pins:{batch_id}")
    raw = tx.scalar("SELECT pinned_versions FROM batches WHERE id = ?", (batch_id,))
    pins = json.loads(raw) if raw else {}
    if group not in pins:
        pins[group] = label
        tx.execute("UPDATE batches SET pinned_versions = ? WHERE id = ?", (json.dumps(pins), batch_id))
    return pins[group]
