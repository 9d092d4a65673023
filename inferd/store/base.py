"""SQL persistence behind one small interface: SQLite by default, PostgreSQL for several replicas.

Everything the platform layer keeps (teams, API keys, rate-limit buckets, budget
reservations and spend, the usage ledger, batch state) goes through
`Store.run(fn)`: `fn` is a plain function that receives a `Tx` and runs its
statements inside one transaction on the store's worker threads, so the event
loop never waits on the database and the same function runs unchanged on both
backends (`run_sync` is the same call for the command line).

SQL is written once, with `?` placeholders and portable types (TEXT, INTEGER,
DOUBLE PRECISION). `Tx.lock(name)` serialises read-then-write transactions on
the same counters across processes: an advisory transaction lock on PostgreSQL;
SQLite write transactions are serial already. A transaction that loses a
deadlock or serialization race is run again, so `fn` must not keep state
between calls other than what it returns.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
Row = tuple


class Tx(ABC):
    """One open transaction."""

    dialect: str  # "sqlite" | "postgresql"

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    @abstractmethod
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    @abstractmethod
    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self.fetchall(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.fetchone(sql, params)
        return None if row is None else row[0]

    @abstractmethod
    def lock(self, name: str) -> None:
        """Hold `name` until this transaction ends; other transactions locking it wait."""


class Store(ABC):
    """A database that runs transaction functions on its own worker threads."""

    url: str
    dialect: str

    def __init__(self, workers: int):
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inferd-store")

    @abstractmethod
    def run_sync(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn` in one transaction, committed when it returns, rolled back when it raises."""

    async def run(self, fn: Callable[[Tx], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run_sync, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._close_connections()

    @abstractmethod
    def _close_connections(self) -> None: ...

    def redacted_url(self) -> str:
        """The URL without its password, for logs."""
        scheme, sep, rest = self.url.partition("://")
        creds, at, host = rest.rpartition("@")
        if not at or ":" not in creds:
            return self.url
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
