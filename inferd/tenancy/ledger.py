"""The usage ledger: one row per metered request, written when the request ends.

A row says who asked (key, team), what for (endpoint, the public model asked
for, the group, deployment and model version that answered), what it used (prompt, cached and
completion tokens, the reasoning tokens among them, from the usage the client was given, or counted from the
stream when a client left early), what it cost, how long it took, and how it
went (HTTP status, cancelled, fell back, degraded, answered from the response
cache, usage estimated). Attempts that failed and fell over to another
deployment are not rows: only the request is.
"""

from __future__ import annotations

import dataclasses
import random
import secrets
import time
from dataclasses import dataclass, field

from inferd.store.base import Tx
from inferd.wire.json_shape import is_text


_ROW_ID_BITS = random.Random(secrets.randbits(64))  # seeded once: ids need to be unique, not secret


def new_row_id() -> str:
    """Time-ordered (nanoseconds, then random bits), so new rows append at the end of the primary key's
    index instead of landing at random places in it. The random bits come from a generator seeded
    once, not from the OS on every row (a system call per request)."""
    return f"{time.time_ns():016x}{_ROW_ID_BITS.getrandbits(48):012x}"


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
    model_version: str | None = None       # the model version that deployment belongs to
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0              # of the completion tokens, those spent thinking
    predictions: int = 0                   # rows a tensor model scored (infer calls)
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

    def cleared(self) -> tuple["LedgerRow", list[str]]:
        """A copy a store can take, and the names of the fields that had to be cleared.

        A field that is not of its declared type, a number out of the store's range, or
        text that is not valid Unicode is reset to its default (None, 0 or False);
        the counts and money that can be kept are kept, so the row still bills.
        """
        values, bad = {}, []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _storable(value, _KINDS[f.name]):
                bad.append(f.name)
                value = _default(f)
            values[f.name] = value
        return LedgerRow(**values), bad


COLUMNS = tuple(f.name for f in dataclasses.fields(LedgerRow))
_I63 = 2**63 - 1
# each column's Python kind and whether it may be NULL, from the annotations above
_KINDS = {f.name: ({"str": str, "int": int, "float": float, "bool": bool}[f.type.split(" | ")[0]],
                   "None" in f.type) for f in dataclasses.fields(LedgerRow)}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _KINDS[f.name][0]()  # a required field: 0, 0.0 or ""


def _storable(value, kind: tuple[type, bool]) -> bool:
    py, nullable = kind
    if value is None:
        return nullable
    if py is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300
    if py is int:
        return isinstance(value, int) and not isinstance(value, bool) and -_I63 <= value <= _I63
    if py is str:
        return isinstance(value, str) and is_text(value)
    return isinstance(value, bool)


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
