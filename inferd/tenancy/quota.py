"""Rate limits, parallelism and budgets, enforced in the store so every replica sees the same counts.

`admit` runs before a request goes to the gateway: one transaction that locks
the team's and the key's scopes (in that order, so two requests never wait on
each other crosswise), checks every limit that is set, and only when all pass
takes from the token buckets and writes a ticket. `settle` runs when requests
have ended: it deletes their tickets, books the real cost against the budgets,
gives back the tokens the worst case over-reserved, and writes the ledger rows,
all in one transaction for a batch of requests.

- Requests and tokens per minute are token buckets (capacity = the limit, refilled
  at limit/60 per second): a burst up to the limit, then a steady rate, and an
  exact `Retry-After` for when the bucket will hold enough.
- Parallel requests are the scope's live tickets.
- A budget holds the period's settled spend plus the worst-case cost of every
  live ticket; a request is admitted only if its own worst case still fits, so
  concurrent requests cannot overspend by more than what the worst case
  under-estimates. Tickets of a replica that died expire after `TICKET_TTL_S`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from inferd.store.base import Tx
from inferd.tenancy.keys import Limits, Principal
from inferd.tenancy.ledger import LedgerRow, insert
from inferd.wire.errors import ErrorKind, InferdError

TICKET_TTL_S = 900.0
_USD_EPSILON = 1e-9  # sums of float costs drift in the last bits; a budget is not broken by that


@dataclass(frozen=True)
class Demand:
    """The worst case of one request: what is reserved before it runs."""

    tokens: int
    cost_usd: float

    def __post_init__(self):
        # a reservation is never negative: a negative one would fill a bucket past its limit
        if not (isinstance(self.tokens, int) and self.tokens >= 0):
            raise ValueError(f"a demand's tokens must be an integer >= 0, got {self.tokens!r}")
        if not self.cost_usd >= 0:
            raise ValueError(f"a demand's cost must be >= 0, got {self.cost_usd!r}")


class QuotaExceeded(InferdError):
    """A limit refused the request: 429 with Retry-After for rates, 402 for budgets."""

    def __init__(self, status: int, message: str, code: str, retry_after: float | None = None):
        super().__init__(ErrorKind.QUOTA, message, status=status, code=code, retry_after=retry_after)


@dataclass
class Ticket:
    id: str
    principal: Principal | None
    demand: Demand
    admitted_at: float
    scopes: list[tuple[str, Limits]] = field(default_factory=list)  # only scopes with limits
    written: bool = False  # a tickets row exists (parallelism or budget limited)


def period_key(period: str, now: float) -> str:
    t = time.gmtime(now)
    if period == "daily":
        return f"d:{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
    if period == "monthly":
        return f"m:{t.tm_year:04d}-{t.tm_mon:02d}"
    return "total"


def scopes_of(principal: Principal | None) -> list[tuple[str, Limits]]:
    """(scope, limits) for the team and the key, team first; those without any limit left out."""
    if principal is None:
        return []
    out = []
    if principal.team is not None and principal.team_limits.any:
        out.append((f"team:{principal.team}", principal.team_limits))
    if principal.key_limits.any:
        out.append((f"key:{principal.key_id}", principal.key_limits))
    return out


def _describe(scope: str) -> str:
    kind, _, name = scope.partition(":")
    return f"team {name!r}" if kind == "team" else f"key {name}"


class _Bucket:
    """A token bucket row read (and refilled to `now`) inside a transaction."""

    def __init__(self, tx: Tx, scope: str, kind: str, per_minute: int, now: float):
        self.scope, self.kind, self.capacity, self.rate = scope, kind, float(per_minute), per_minute / 60.0
        row = tx.fetchone("SELECT level, updated FROM rate_buckets WHERE scope = ? AND kind = ?", (scope, kind))
        if row is None:
            self.level = self.capacity
        else:
            self.level = min(self.capacity, row[0] + max(0.0, now - row[1]) * self.rate)
        self.now = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds `amount` (0: now)."""
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def save(self, tx: Tx, level: float) -> None:
        """Store `level`, held within [0, capacity] whatever arithmetic produced it."""
        level = max(0.0, min(self.capacity, level))
        tx.execute("INSERT INTO rate_buckets (scope, kind, level, updated) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (scope, kind) DO UPDATE SET level = excluded.level, updated = excluded.updated",
                   (self.scope, self.kind, level, self.now))


def _live_tickets(tx: Tx, scope: str, now: float) -> tuple[int, float]:
    column = "team_scope" if scope.startswith("team:") else "key_scope"
    count, reserved = tx.fetchone(f"SELECT COUNT(*), COALESCE(SUM(reserved_usd), 0) FROM tickets "
                                  f"WHERE {column} = ? AND created > ?", (scope, now - TICKET_TTL_S))
    return int(count), float(reserved)


def _spent(tx: Tx, scope: str, period: str, now: float) -> float:
    value = tx.scalar("SELECT spent_usd FROM spend WHERE scope = ? AND period = ?",
                      (scope, period_key(period, now)))
    return float(value or 0.0)


def admit(tx: Tx, principal: Principal | None, demand: Demand, now: float) -> Ticket:
    """Check every limit of the key and its team; reserve and return a ticket, or raise QuotaExceeded."""
    scopes = scopes_of(principal)
    ticket = Ticket(uuid.uuid4().hex, principal, demand, now, scopes)
    if not scopes:
        return ticket
    for scope, _ in scopes:
        tx.lock(scope)
    takes: list[tuple[_Bucket, float]] = []
    for scope, limits in scopes:
        who = _describe(scope)
        if limits.tpm is not None and demand.tokens > limits.tpm:
            raise QuotaExceeded(429, f"this request may use up to {demand.tokens} tokens, more than the "
                                f"{limits.tpm} tokens per minute {who} may use; lower max_tokens",
                                "tokens_per_minute_exceeded")
        for kind, per_minute, amount in (("rpm", limits.rpm, 1.0), ("tpm", limits.tpm, float(demand.tokens))):
            if per_minute is None:
                continue
            bucket = _Bucket(tx, scope, kind, per_minute, now)
            wait = bucket.wait_for(amount)
            if wait > 0:
                unit = "requests" if kind == "rpm" else "tokens"
                raise QuotaExceeded(429, f"rate limit of {per_minute} {unit} per minute for {who} reached; "
                                    f"retry in {wait:.1f} s", f"{unit}_per_minute_exceeded", retry_after=wait)
            takes.append((bucket, bucket.level - amount))
        if limits.max_parallel is not None or limits.budget_usd is not None:
            in_flight, reserved = _live_tickets(tx, scope, now)
            if limits.max_parallel is not None and in_flight >= limits.max_parallel:
                raise QuotaExceeded(429, f"{who} already has {in_flight} requests in flight, its limit",
                                    "parallel_requests_exceeded", retry_after=1.0)
            if limits.budget_usd is not None:
                spent = _spent(tx, scope, limits.budget_period, now)
                if spent + reserved + demand.cost_usd > limits.budget_usd + _USD_EPSILON:
                    raise QuotaExceeded(
                        402, f"the {limits.budget_period} budget of ${limits.budget_usd:.4f} for {who} is used "
                        f"up: ${spent:.4f} spent, ${reserved:.4f} reserved by requests in flight, and this "
                        f"request may cost up to ${demand.cost_usd:.4f}", "budget_exceeded")
            ticket.written = True
    for bucket, level in takes:
        bucket.save(tx, level)
    if ticket.written:
        key_scope = next((s for s, _ in scopes if s.startswith("key:")), None)
        team_scope = next((s for s, _ in scopes if s.startswith("team:")), None)
        tx.execute("INSERT INTO tickets (id, key_scope, team_scope, reserved_usd, reserved_tokens, created) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (ticket.id, key_scope, team_scope, demand.cost_usd, demand.tokens, now))
    return ticket


def settle(tx: Tx, settled: list[tuple[Ticket, LedgerRow, float]]) -> None:
    """End tickets (ticket, its ledger row, when it ended): release, book, and write the rows at once."""
    for ticket, row, now in settled:
        _release(tx, ticket, row, now)
    insert(tx, [row for _, row, _ in settled])


def release(tx: Tx, ticket: Ticket, row: LedgerRow, now: float) -> None:
    """End a ticket without writing its row (work that will run again elsewhere and be billed there)."""
    _release(tx, ticket, row, now)


def _release(tx: Tx, ticket: Ticket, row: LedgerRow, now: float) -> None:
    """Release a ticket's reservation, book its real cost and give back the tokens it did not use."""
    for scope, _ in ticket.scopes:
        tx.lock(scope)
    if ticket.written:
        tx.execute("DELETE FROM tickets WHERE id = ?", (ticket.id,))
    for scope, limits in ticket.scopes:
        if limits.budget_usd is not None and row.cost_usd > 0:
            tx.execute("INSERT INTO spend (scope, period, spent_usd) VALUES (?, ?, ?) ON CONFLICT (scope, period) "
                       "DO UPDATE SET spent_usd = spend.spent_usd + excluded.spent_usd",
                       (scope, period_key(limits.budget_period, ticket.admitted_at), row.cost_usd))
        if limits.tpm is not None and row.total_tokens != ticket.demand.tokens:
            bucket = _Bucket(tx, scope, "tpm", limits.tpm, now)
            bucket.save(tx, bucket.level + ticket.demand.tokens - max(0, row.total_tokens))
