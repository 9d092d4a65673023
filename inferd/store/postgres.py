"""The shared store for several replicas: PostgreSQL through psycopg 3 and a connection pool.

SQLite is one file on one machine; replicas behind a load balancer need one
database they all reach, and PostgreSQL is the common one. Each store worker
thread borrows a connection from a `psycopg_pool.ConnectionPool` sized to the
worker count, so a transaction never waits for a connection another worker
holds, and runs the transaction function inside `conn.transaction()`.

The SQL the platform layer writes uses `?` placeholders (SQLite's style); they
become `%s` here. `Tx.lock(name)` is a transaction-scoped advisory lock on a
hash of the name, so read-then-write sequences on the same counter (rate-limit
buckets, budget reservations) are serial across every replica, and the lock is
released by COMMIT or ROLLBACK without any cleanup. A transaction that loses a
deadlock or a serialization race is run again from the start.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from inferd.store.base import Row, Store, T, Tx

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.types.numeric import Int8Dumper
    from psycopg_pool import ConnectionPool
except ImportError:  # the extra is optional: SQLite needs none of it
    psycopg = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# a lost deadlock or serialization race says nothing about the transaction
# itself: running it again usually succeeds, so a few tries hide the race from callers
_RETRIES = 5


def _to_pyformat(sql: str) -> str:
    # psycopg's placeholder is %s; the project's SQL never contains a literal ? or %
    return sql.replace("?", "%s")


if psycopg is not None:

    class _BoolAsIntDumper(Int8Dumper):
        """Send Python booleans as integers, as sqlite3 does.

        The schema has no BOOLEAN columns (flags are INTEGER on both backends), and
        PostgreSQL refuses a boolean parameter for an integer column, so without this a
        transaction function passing `True` would work on SQLite and fail here.
        """


def _configure(conn: Any) -> None:
    conn.adapters.register_dumper(bool, _BoolAsIntDumper)


class PostgresTx(Tx):
    dialect = "postgresql"

    def __init__(self, conn: psycopg.Connection):
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(_to_pyformat(sql), params).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(_to_pyformat(sql), rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(_to_pyformat(sql), params).fetchall()

    def lock(self, name: str) -> None:
        # advisory locks take a bigint key; hashtextextended maps any name to one. A
        # collision between two names only makes them wait for each other, never wrong
        self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (name,))


class PostgresStore(Store):
    dialect = "postgresql"

    def __init__(self, url: str, workers: int = 4):
        if psycopg is None:
            raise ValueError(
                "a postgresql:// store needs psycopg and psycopg-pool: pip install 'inferd[postgres]'"
            )
        super().__init__(workers=workers)
        self.url = url
        # one probe connection first: a wrong host, database or password fails here at
        # once with libpq's own message, where the pool would only retry in the
        # background and time out with a generic one. libpq's messages name the host,
        # port and user, never the password
        try:
            psycopg.connect(url).close()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=workers,
            # autocommit so that conn.transaction() alone opens and ends each transaction,
            # instead of an implicit one that the pool would settle when the connection returns
            kwargs={"autocommit": True},
            configure=_configure,
            # the pool logs connection problems under this name: the URL without its password
            name=self.redacted_url(),
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=30.0)
        except BaseException:
            self._pool.close()
            self._executor.shutdown(wait=False)
            raise

    def run_sync(self, fn: Callable[[Tx], T]) -> T:
        for attempt in range(_RETRIES + 1):
            try:
                with self._pool.connection() as conn, conn.transaction():
                    return fn(PostgresTx(conn))
            except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected) as e:
                if attempt == _RETRIES:
                    raise
                log.debug("store transaction retried after %s", type(e).__name__)
                # a short random pause, growing with each try, so the transactions that
                # collided do not collide again in the same order
                time.sleep(random.uniform(0, 0.005 * 2**attempt))
        raise AssertionError("unreachable")

    def _close_connections(self) -> None:
        self._pool.close()
