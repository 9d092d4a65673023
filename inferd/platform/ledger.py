"""The usage ledger: one row per metered request, written when the request ends.

A row says who asked (key, team), what for (endpoint, the public model asked
for, the group and deployment that answered), what it used (prompt, cached and
completion tokens, from the usage the client was given, or counted from the
stream when a client left early), what it cost, how long it took, and how it
went (HTTP status, cancelled, fell back, degraded, answered from the response
cache, usage estimated). Attempts that failed and fell over to another
deployment are not rows: only the request is.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field

from inferd.store.base import Tx


def new_row_id() -> str:
    """Time-ordered (nanoseconds, then random bits), so new rows append at the end of the primary key's
    index instead of landing at random places in it."""
    return f"{time.time_ns():016x}{secrets.token_hex(6)}"


@dataclass
class LedgerRow:
    ts: float                              # when the request arrived (Unix seconds)
    endpoint: str                          # chat | completions | embeddings
    status: int                            # the HTTP status the client got
    request_id: str | None = None
    key_id: str | None = None              # None: open server, no key
    team: str | None = None
    model: str | None = None               # the public model the client asked for
    served_model: str | None = None        # the model group that answered
    deployment: str | None = None          # the deployment that answered
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float | None = None
    ttft_s: float | None = None
    stream: bool = False
    cancelled: bool = False
    fallback_from: str | None = None
    degraded_from: str | None = None
    cache_hit: bool = False
    usage_estimated: bool = False          # counted from a stream that ended without a usage report
    batch_id: str | None = None
    id: str = field(default_factory=lambda: new_row_id())

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


COLUMNS = tuple(f.name for f in dataclasses.fields(LedgerRow))
_INSERT = f"INSERT INTO ledger ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_BOOLS = {"stream", "cancelled", "cache_hit", "usage_estimated"}


def _values(row: LedgerRow) -> tuple:
    # attribute reads, not dataclasses.astuple (which deep-copies every field): this runs per request
    return tuple(int(getattr(row, k)) if k in _BOOLS else getattr(row, k) for k in COLUMNS)


def insert(tx: Tx, rows: list[LedgerRow]) -> None:
    tx.executemany(_INSERT, [_values(r) for r in rows])


def select(tx: Tx, where: str = "", params: tuple = ()) -> list[LedgerRow]:
    """Rows matching a WHERE clause (without the keyword), oldest first."""
    sql = f"SELECT {', '.join(COLUMNS)} FROM ledger" + (f" WHERE {where}" if where else "") + " ORDER BY ts, id"
    return [LedgerRow(**{k: bool(v) if k in _BOOLS else v for k, v in zip(COLUMNS, row)})
            for row in tx.fetchall(sql, params)]
