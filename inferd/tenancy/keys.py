"""Teams and API keys: created, listed, revoked, and looked up by the hash of a presented key.

A key is `sk-inferd-` plus 43 random URL-safe characters (256 bits); only its
SHA-256 is stored (a key that random needs no salt or slow hash: nothing can
be guessed from the digest), so the secret is shown once, at creation, and
lists show only its first characters. Every key belongs to a team; a team row
is created with its first key. Keys and teams each carry optional limits
(`Limits`); an admin key may also manage keys and see everyone's usage.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import asdict, dataclass
from typing import Literal

from inferd.store.base import Tx

KEY_PREFIX = "sk-inferd-"
BUDGET_PERIODS = ("daily", "monthly", "total")
BudgetPeriod = Literal["daily", "monthly", "total"]


@dataclass(frozen=True)
class Limits:
    """What one key or one team may use; None means no limit."""

    budget_usd: float | None = None
    budget_period: str = "monthly"
    rpm: int | None = None             # requests per minute
    tpm: int | None = None             # tokens (prompt + completion) per minute
    max_parallel: int | None = None    # requests in flight at once

    def __post_init__(self):
        if self.budget_period not in BUDGET_PERIODS:
            raise ValueError(f"budget_period must be one of {', '.join(BUDGET_PERIODS)}, "
                             f"not {self.budget_period!r}")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ValueError("budget_usd must be >= 0")
        for name in ("rpm", "tpm", "max_parallel"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1")

    def budget_only(self) -> Limits:
        """The same budget without the rate limits (what a batch line is held to: the runner paces it)."""
        return Limits(self.budget_usd, self.budget_period)

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.budget_usd, self.rpm, self.tpm, self.max_parallel))

    def columns(self) -> tuple:
        return self.budget_usd, self.budget_period, self.rpm, self.tpm, self.max_parallel

    @classmethod
    def from_columns(cls, budget_usd, budget_period, rpm, tpm, max_parallel) -> Limits:
        return cls(budget_usd, budget_period or "monthly", rpm, tpm, max_parallel)


_LIMIT_COLS = "budget_usd, budget_period, rpm, tpm, max_parallel"


@dataclass(frozen=True)
class Principal:
    """Who is asking: a key with its team, and the limits that apply to it."""

    key_id: str
    team: str | None
    is_admin: bool = False
    key_limits: Limits = Limits()
    team_limits: Limits = Limits()
    cache_ttl: float | None = None     # answers to this key are cached this long (seconds)

    @property
    def limited(self) -> bool:
        return self.key_limits.any or self.team_limits.any


@dataclass(frozen=True)
class KeyInfo:
    """A key as lists show it: never the secret."""

    id: str
    prefix: str
    name: str | None
    team: str
    is_admin: bool
    limits: Limits
    cache_ttl: float | None
    created: float
    revoked: float | None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("limits"))
        return d


@dataclass(frozen=True)
class TeamInfo:
    name: str
    limits: Limits
    created: float

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self.limits), "created": self.created}


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_team(team: str) -> str:
    team = (team or "").strip()
    if not team or len(team) > 64:
        raise ValueError("a team name must be 1 to 64 characters")
    return team


def ensure_team(tx: Tx, team: str, now: float) -> None:
    tx.execute("INSERT INTO teams (name, created) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (team, now))


def create_key(tx: Tx, *, team: str, now: float, name: str | None = None, limits: Limits = Limits(),
               is_admin: bool = False, cache_ttl: float | None = None) -> tuple[KeyInfo, str]:
    """A new key; returns its record and the secret, which is not stored and cannot be shown again."""
    team = _check_team(team)
    if cache_ttl is not None and cache_ttl <= 0:
        raise ValueError("cache_ttl must be > 0 seconds")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    info = KeyInfo(id="key_" + secrets.token_hex(8), prefix=secret[:len(KEY_PREFIX) + 4], name=name, team=team,
                   is_admin=is_admin, limits=limits, cache_ttl=cache_ttl, created=now, revoked=None)
    ensure_team(tx, team, now)
    tx.execute(f"INSERT INTO api_keys (id, key_hash, prefix, name, team, is_admin, {_LIMIT_COLS}, cache_ttl, "
               f"created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (info.id, hash_key(secret), info.prefix, name, team, int(is_admin), *limits.columns(),
                cache_ttl, now))
    return info, secret


def _key_info(row) -> KeyInfo:
    kid, prefix, name, team, is_admin, b, bp, rpm, tpm, par, ttl, created, revoked = row
    return KeyInfo(kid, prefix, name, team, bool(is_admin), Limits.from_columns(b, bp, rpm, tpm, par), ttl,
                   created, revoked)


_KEY_COLS = f"id, prefix, name, team, is_admin, {_LIMIT_COLS}, cache_ttl, created, revoked"


def list_keys(tx: Tx, team: str | None = None, include_revoked: bool = False) -> list[KeyInfo]:
    where, params = [], []
    if team is not None:
        where.append("team = ?")
        params.append(team)
    if not include_revoked:
        where.append("revoked IS NULL")
    sql = f"SELECT {_KEY_COLS} FROM api_keys" + (" WHERE " + " AND ".join(where) if where else "")
    return [_key_info(r) for r in tx.fetchall(sql + " ORDER BY created, id", params)]


def get_key(tx: Tx, key_id: str) -> KeyInfo | None:
    row = tx.fetchone(f"SELECT {_KEY_COLS} FROM api_keys WHERE id = ?", (key_id,))
    return None if row is None else _key_info(row)


def revoke_key(tx: Tx, key_id: str, now: float) -> bool:
    """Revoke a key; False if there is no such key or it was revoked already."""
    return tx.execute("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (now, key_id)) > 0


def set_team(tx: Tx, team: str, limits: Limits, now: float) -> TeamInfo:
    """Create a team or replace its limits."""
    team = _check_team(team)
    ensure_team(tx, team, now)
    tx.execute("UPDATE teams SET budget_usd = ?, budget_period = ?, rpm = ?, tpm = ?, max_parallel = ? "
               "WHERE name = ?", (*limits.columns(), team))
    return get_team(tx, team)


def get_team(tx: Tx, team: str) -> TeamInfo | None:
    row = tx.fetchone(f"SELECT name, {_LIMIT_COLS}, created FROM teams WHERE name = ?", (team,))
    return None if row is None else TeamInfo(row[0], Limits.from_columns(*row[1:6]), row[6])


def list_teams(tx: Tx) -> list[TeamInfo]:
    return [TeamInfo(r[0], Limits.from_columns(*r[1:6]), r[6])
            for r in tx.fetchall(f"SELECT name, {_LIMIT_COLS}, created FROM teams ORDER BY name")]


def find_principal(tx: Tx, key_hash: str) -> Principal | None:
    """The live key with this hash (`hash_key`), with its team's limits; None for unknown or revoked keys."""
    return _principal(tx, "k.key_hash = ? AND k.revoked IS NULL", key_hash)


def principal_of_key(tx: Tx, key_id: str) -> Principal | None:
    """The key with this id, revoked or not (work it started is still billed to it), with its limits."""
    return _principal(tx, "k.id = ?", key_id)


def _principal(tx: Tx, where: str, value: str) -> Principal | None:
    row = tx.fetchone(
        f"SELECT k.id, k.team, k.is_admin, k.budget_usd, k.budget_period, k.rpm, k.tpm, k.max_parallel, "
        f"k.cache_ttl, t.budget_usd, t.budget_period, t.rpm, t.tpm, t.max_parallel "
        f"FROM api_keys k LEFT JOIN teams t ON t.name = k.team WHERE {where}", (value,))
    if row is None:
        return None
    return Principal(key_id=row[0], team=row[1], is_admin=bool(row[2]),
                     key_limits=Limits.from_columns(*row[3:8]), cache_ttl=row[8],
                     team_limits=Limits.from_columns(*row[9:14]))


def has_keys(tx: Tx) -> bool:
    return tx.fetchone("SELECT 1 FROM api_keys WHERE revoked IS NULL LIMIT 1") is not None
