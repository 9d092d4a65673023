"""The ledger never stalls, and quota arithmetic stays in bounds whatever it is given.

A row the store rejects (a field of the wrong type, text that is not Unicode) is
written with the offending fields cleared, and the good rows around it are
written as they are; a store that is down keeps the rows for the next try.
Token buckets stay within [0, capacity] for any sequence of reservations and
settlements (a property test over the real store).
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferd.store import open_store
from inferd.tenancy import quota
from inferd.tenancy.keys import Limits, Principal
from inferd.tenancy.ledger import LedgerRow, select
from inferd.tenancy.metering import Metering
from inferd.tenancy.prices import PriceBook
from inferd.tenancy.quota import Demand

T0 = 1_790_000_000.0


def row(i: int, **fields) -> LedgerRow:
    fields = {"request_id": f"req-{i}", **fields}
    return LedgerRow(ts=T0 + i, endpoint="chat", status=200, prompt_tokens=i, **fields)


def bare_ticket(r: LedgerRow) -> quota.Ticket:
    return quota.Ticket("", None, Demand(0, 0.0), r.ts)


@pytest.fixture
def sqlite_store(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/ledger.db")
    yield store
    store.close()


def test_a_bad_row_between_good_ones_is_written_cleared_and_the_rest_as_they_are(sqlite_store, caplog):
    metering = Metering(sqlite_store, PriceBook({}, {}), flush_interval_s=0.01)
    bad = [row(1, model={}), row(3, request_id="a\ud800b"), row(5, cached_tokens=2**70)]
    good = [row(0), row(2), row(4), row(6)]

    async def run():
        for r in sorted(bad + good, key=lambda r: r.ts):
            metering.settle_soon(bare_ticket(r), r)
        await asyncio.sleep(0.2)
        assert await metering.flush()
        # the ledger keeps working afterwards
        later = row(7)
        metering.settle_soon(bare_ticket(later), later)
        assert await metering.flush()

    asyncio.run(run())
    written = sqlite_store.run_sync(lambda tx: select(tx))
    assert [r.prompt_tokens for r in written] == list(range(8))  # every request billed, once, in order
    by_tokens = {r.prompt_tokens: r for r in written}
    assert by_tokens[1].model is None and by_tokens[1].request_id == "req-1"
    assert by_tokens[3].request_id is None and by_tokens[5].cached_tokens == 0
    assert all(by_tokens[i].request_id == f"req-{i}" for i in (0, 2, 4, 6, 7))
    assert "req-1" in caplog.text and "model cleared" in caplog.text


def test_a_store_that_is_down_keeps_the_rows_for_the_next_try(sqlite_store):
    metering = Metering(sqlite_store, PriceBook({}, {}), flush_interval_s=0.01, retry_interval_s=0.05)
    real_run = sqlite_store.run
    down = {"on": True}

    async def flaky_run(fn):
        if down["on"]:
            raise ConnectionError("the store is unreachable")
        return await real_run(fn)

    sqlite_store.run = flaky_run

    async def run():
        for i in range(3):
            metering.settle_soon(bare_ticket(row(i)), row(i))
        await asyncio.sleep(0.1)
        assert not await metering.flush()
        down["on"] = False
        await asyncio.sleep(0.3)  # the retry comes by itself, with no new request to trigger it

    asyncio.run(run())
    sqlite_store.run = real_run
    assert len(sqlite_store.run_sync(lambda tx: select(tx))) == 3


def test_a_demand_is_never_negative():
    with pytest.raises(ValueError):
        Demand(-1, 0.0)
    with pytest.raises(ValueError):
        Demand(10, -0.5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.integers(0, 5000), st.integers(-2**40, 2**40), st.floats(0, 120)),
                      min_size=1, max_size=12))
def test_token_buckets_stay_within_zero_and_capacity(sqlite_store, steps):
    tpm = 1000
    who = Principal(key_id=f"key-{id(steps)}", team=None, key_limits=Limits(tpm=tpm))
    now = T0
    for reserve, used, wait in steps:
        now += wait
        try:
            ticket = sqlite_store.run_sync(lambda tx: quota.admit(tx, who, Demand(reserve, 0.0), now))
        except quota.QuotaExceeded as refusal:
            assert refusal.retry_after is None or 0 <= refusal.retry_after <= 60
            continue
        settled = LedgerRow(ts=now, endpoint="chat", status=200, key_id=who.key_id, completion_tokens=used)
        sqlite_store.run_sync(lambda tx: quota.settle(tx, [(ticket, settled, now)]))
        level = sqlite_store.run_sync(lambda tx: tx.scalar(
            "SELECT level FROM rate_buckets WHERE scope = ? AND kind = 'tpm'", (f"key:{who.key_id}",)))
        assert 0 <= level <= tpm
