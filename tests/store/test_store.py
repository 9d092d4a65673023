"""The store contract, on SQLite and on a real PostgreSQL (tests/store_fixtures.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from inferd.store import open_store
from inferd.store.schema import MIGRATIONS, migrate

COUNTER_TABLE = "CREATE TABLE test_counter (name TEXT PRIMARY KEY, n INTEGER NOT NULL)"


def _in_threads(*targets):
    """Run each callable on its own thread, started together; returns their results or exceptions."""
    start = threading.Barrier(len(targets))
    results: list = [None] * len(targets)

    def run(i, target):
        start.wait()
        try:
            results[i] = target()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a store thread hung"
    return results


def _versions(tx):
    return tx.fetchall("SELECT version FROM schema_version ORDER BY version")


def test_migration_is_idempotent(store_url):
    first = open_store(store_url)
    try:
        assert first.run_sync(_versions) == [(v,) for v in range(1, len(MIGRATIONS) + 1)]
        first.run_sync(lambda tx: tx.execute("INSERT INTO teams (name, created) VALUES (?, ?)", ("t", 1.0)))
    finally:
        first.close()
    second = open_store(store_url)
    try:
        # opening again applied nothing twice and kept the data
        assert second.run_sync(_versions) == [(v,) for v in range(1, len(MIGRATIONS) + 1)]
        assert second.run_sync(migrate) == len(MIGRATIONS)
        assert second.run_sync(lambda tx: tx.fetchall("SELECT name FROM teams")) == [("t",)]
    finally:
        second.close()


def test_two_stores_migrate_the_same_fresh_database_at_once(store_url):
    results = _in_threads(lambda: open_store(store_url), lambda: open_store(store_url))
    errors = [r for r in results if isinstance(r, BaseException)]
    for r in results:
        if not isinstance(r, BaseException):
            try:
                assert r.run_sync(_versions) == [(v,) for v in range(1, len(MIGRATIONS) + 1)]
            finally:
                r.close()
    assert errors == []


def test_a_transaction_that_raises_is_rolled_back(store):
    class Boom(Exception):
        pass

    def insert_then_fail(tx):
        tx.execute("INSERT INTO teams (name, created) VALUES (?, ?)", ("gone", 1.0))
        assert tx.scalar("SELECT COUNT(*) FROM teams") == 1  # visible inside the transaction
        raise Boom

    with pytest.raises(Boom):
        store.run_sync(insert_then_fail)
    assert store.run_sync(lambda tx: tx.scalar("SELECT COUNT(*) FROM teams")) == 0

    # an SQL error rolls back too, and leaves the connection usable
    def insert_twice(tx):
        tx.execute("INSERT INTO teams (name, created) VALUES (?, ?)", ("dup", 1.0))
        tx.execute("INSERT INTO teams (name, created) VALUES (?, ?)", ("dup", 2.0))

    with pytest.raises(Exception, match="(?i)unique"):
        store.run_sync(insert_twice)
    assert store.run_sync(lambda tx: tx.scalar("SELECT COUNT(*) FROM teams")) == 0
    store.run_sync(lambda tx: tx.execute("INSERT INTO teams (name, created) VALUES (?, ?)", ("kept", 1.0)))
    assert store.run_sync(lambda tx: tx.fetchall("SELECT name FROM teams")) == [("kept",)]


def test_run_from_asyncio(store):
    def insert(i):
        def fn(tx):
            tx.execute("INSERT INTO teams (name, created) VALUES (?, ?)", (f"team-{i}", float(i)))
            return tx.scalar("SELECT created FROM teams WHERE name = ?", (f"team-{i}",))

        return fn

    async def main():
        loop_thread = threading.get_ident()
        threads = []

        def where(tx):
            threads.append(threading.get_ident())
            return tx.scalar("SELECT COUNT(*) FROM teams")

        results = await asyncio.gather(*(store.run(insert(i)) for i in range(12)))
        count = await store.run(where)
        assert threads and loop_thread not in threads  # ran on a worker, not on the loop
        return results, count

    results, count = asyncio.run(main())
    assert results == [float(i) for i in range(12)]
    assert count == 12


def _increment(lock: bool, pause: float = 0.0):
    def fn(tx):
        if lock:
            tx.lock("counter")
        n = tx.scalar("SELECT n FROM test_counter WHERE name = ?", ("c",))
        if pause:
            time.sleep(pause)
        tx.execute("UPDATE test_counter SET n = ? WHERE name = ?", (n + 1, "c"))

    return fn


def _make_counter(tx):
    tx.execute(COUNTER_TABLE)
    tx.execute("INSERT INTO test_counter (name, n) VALUES (?, ?)", ("c", 0))


def test_lock_makes_read_then_write_exact(store_url):
    stores = [open_store(store_url), open_store(store_url)]
    try:
        stores[0].run_sync(_make_counter)
        # which threads hold the counter at once, seen from inside the transactions
        inside, most_inside, guard = [0], [0], threading.Lock()

        def increment(tx):
            tx.lock("counter")
            with guard:
                inside[0] += 1
                most_inside[0] = max(most_inside[0], inside[0])
            try:
                _increment(lock=False)(tx)
            finally:
                with guard:
                    inside[0] -= 1

        def worker(store):
            def loop():
                for _ in range(50):
                    store.run_sync(increment)

            return loop

        results = _in_threads(*(worker(s) for s in stores for _ in range(4)))
        assert [r for r in results if r is not None] == []
        assert stores[1].run_sync(lambda tx: tx.scalar("SELECT n FROM test_counter")) == 400
        assert most_inside[0] == 1
    finally:
        for s in stores:
            s.close()


def test_the_lock_excludes_a_second_transaction(store_url):
    # what makes the count above exact and not lucky: while one transaction holds
    # the lock, the other cannot reach the same point, so neither gets past a
    # barrier that needs both of them there (each gives up after 0.3 s)
    stores = [open_store(store_url), open_store(store_url)]
    try:
        both_inside = threading.Barrier(2)

        def meet(tx):
            tx.lock("counter")
            both_inside.wait(timeout=0.3)

        results = _in_threads(*(lambda s=s: s.run_sync(meet) for s in stores))
        assert all(isinstance(r, threading.BrokenBarrierError) for r in results), results
    finally:
        for s in stores:
            s.close()


def test_without_the_lock_postgresql_loses_updates(postgres_server):
    # the control for the two tests above: on PostgreSQL, READ COMMITTED lets two
    # transactions read the same value and both write value + 1, so without
    # tx.lock one increment of two is lost (SQLite needs no such control: its
    # transactions start with BEGIN IMMEDIATE and never overlap, see above)
    url = postgres_server.new_database()
    stores = [open_store(url), open_store(url)]
    try:
        stores[0].run_sync(_make_counter)
        both_read = threading.Barrier(2)

        def increment(tx):
            n = tx.scalar("SELECT n FROM test_counter WHERE name = ?", ("c",))
            both_read.wait(timeout=10)
            tx.execute("UPDATE test_counter SET n = ? WHERE name = ?", (n + 1, "c"))

        results = _in_threads(*(lambda s=s: s.run_sync(increment) for s in stores))
        assert results == [None, None]
        assert stores[0].run_sync(lambda tx: tx.scalar("SELECT n FROM test_counter")) == 1
    finally:
        for s in stores:
            s.close()
        postgres_server.drop_database(url)


def test_execute_returns_rowcount(store):
    def fn(tx):
        inserted = tx.execute("INSERT INTO teams (name, created) VALUES (?, ?)", ("a", 1.0))
        tx.executemany("INSERT INTO teams (name, created) VALUES (?, ?)", [("b", 2.0), ("c", 3.0), ("d", 4.0)])
        updated = tx.execute("UPDATE teams SET rpm = ? WHERE created >= ?", (10, 3.0))
        none = tx.execute("DELETE FROM teams WHERE name = ?", ("nobody",))
        deleted = tx.execute("DELETE FROM teams WHERE rpm = ?", (10,))
        return inserted, updated, none, deleted, tx.fetchall("SELECT name FROM teams ORDER BY name")

    assert store.run_sync(fn) == (1, 2, 0, 2, [("a",), ("b",)])


def test_booleans_and_nulls_round_trip_alike(store):
    # flags are INTEGER columns on both backends; Python booleans go in as 0 and 1
    def fn(tx):
        tx.execute(
            "INSERT INTO api_keys (id, key_hash, prefix, team, is_admin, created) VALUES (?, ?, ?, ?, ?, ?)",
            ("k1", "h1", "sk-1", "t", True, 1.0),
        )
        tx.execute(
            "INSERT INTO api_keys (id, key_hash, prefix, team, is_admin, created) VALUES (?, ?, ?, ?, ?, ?)",
            ("k2", "h2", "sk-2", "t", False, 2.5),
        )
        return tx.fetchall("SELECT id, is_admin, created, revoked FROM api_keys WHERE is_admin = ?", (True,))

    assert store.run_sync(fn) == [("k1", 1, 1.0, None)]


def test_redacted_url_hides_the_password(store_url):
    if store_url.startswith("sqlite"):
        store = open_store(store_url)
        try:
            assert store.redacted_url() == store_url  # nothing to hide
        finally:
            store.close()
        return
    # trust authentication ignores the password, so the store opens with it
    url = store_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret-pw@")
    assert "s3cret-pw" in url
    store = open_store(url)
    try:
        assert store.run_sync(lambda tx: tx.scalar("SELECT 1")) == 1
        assert "s3cret-pw" not in store.redacted_url()
        assert store.redacted_url() == store_url.replace("postgres@", "postgres:***@")
        assert "s3cret-pw" not in store._pool.name  # the pool names itself in its log lines
    finally:
        store.close()
    # nor does a failed connection's error show it
    with pytest.raises(Exception) as failed:
        open_store("postgresql://postgres:s3cret-pw@127.0.0.1:1/nowhere")
    assert "s3cret-pw" not in str(failed.value)


def test_postgres_retries_a_transaction_that_lost_a_race(postgres_server):
    from psycopg import errors

    from inferd.store.postgres import _RETRIES

    url = postgres_server.new_database()
    store = open_store(url)
    try:
        calls = []

        def flaky(tx):
            calls.append(1)
            # rolled back with each failed try: the retry inserts the same key again
            tx.execute("INSERT INTO teams (name, created) VALUES (?, ?)", ("t", 1.0))
            if len(calls) == 1:
                raise errors.SerializationFailure("could not serialize access")
            if len(calls) == 2:
                raise errors.DeadlockDetected("deadlock detected")
            return tx.scalar("SELECT COUNT(*) FROM teams")

        assert store.run_sync(flaky) == 1
        assert len(calls) == 3

        calls.clear()

        def always(tx):
            calls.append(1)
            raise errors.SerializationFailure("could not serialize access")

        with pytest.raises(errors.SerializationFailure):
            store.run_sync(always)
        assert len(calls) == _RETRIES + 1

        # other errors are not retried
        calls.clear()

        def other(tx):
            calls.append(1)
            raise errors.UniqueViolation("duplicate key")

        with pytest.raises(errors.UniqueViolation):
            store.run_sync(other)
        assert len(calls) == 1
    finally:
        store.close()
        postgres_server.drop_database(url)


def test_postgres_without_psycopg_names_the_extra(monkeypatch):
    import inferd.store.postgres as pg

    monkeypatch.setattr(pg, "psycopg", None)
    with pytest.raises(ValueError, match=r"pip install 'inferd\[postgres\]'"):
        pg.PostgresStore("postgresql://postgres@127.0.0.1:1/db")
