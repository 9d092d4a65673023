"""The embedded default store: one SQLite file, one connection on one worker thread.

WAL mode lets the command line (`inferd keys`, `inferd usage`) read and write
the same file while a server runs; `busy_timeout` makes the other process wait
for a write lock instead of failing. Every transaction starts with BEGIN
IMMEDIATE, so it takes the write lock up front and read-then-write sequences
(rate-limit buckets, budget reservations) cannot interleave between processes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from inferd.store.base import Row, Store, T, Tx


def _enable_wal(conn: sqlite3.Connection, patience_s: float = 30.0) -> None:
    # switching a new file to WAL takes a lock that busy_timeout does not wait for: two processes
    # opening a fresh store at once (a server and `inferd keys`) would see "database is locked"
    deadline = time.monotonic() + patience_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SQLiteTx(Tx):
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, params).fetchall()

    def lock(self, name: str) -> None:
        pass  # BEGIN IMMEDIATE already made this transaction the only writer


class SQLiteStore(Store):
    dialect = "sqlite"

    def __init__(self, path: str | Path):
        super().__init__(workers=1)
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA busy_timeout=30000")
            _enable_wal(conn)
            # in WAL mode a killed process loses no committed transaction; only a power cut may lose the last ones
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            self._conns.append(conn)
        return conn

    def run_sync(self, fn: Callable[[Tx], T]) -> T:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(SQLiteTx(conn))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _close_connections(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns.clear()
