"""Limits and budgets in the store, with an injected clock, on SQLite and on PostgreSQL.

Each rule is checked exactly: a token bucket refills at limit/60 per second and
says when it will hold enough; parallelism counts live tickets (and forgets those
of a replica that died); a budget holds spend plus live reservations, resets with
its period, and holds under concurrent admission from two store instances.
"""

from __future__ import annotations

import threading

import pytest

from inferd.store import open_store
from inferd.tenancy import keys, quota
from inferd.tenancy.keys import Limits, Principal
from inferd.tenancy.ledger import LedgerRow, select
from inferd.tenancy.quota import Demand, QuotaExceeded

T0 = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC


def principal(key: Limits = Limits(), team: Limits = Limits(), key_id="key_a", team_name="t") -> Principal:
    return Principal(key_id=key_id, team=team_name, key_limits=key, team_limits=team)


def admit(store, who, now, tokens=10, cost=0.0):
    return store.run_sync(lambda tx: quota.admit(tx, who, Demand(tokens, cost), now))


def settle(store, ticket, now, prompt=0, completion=0, cost=0.0):
    row = LedgerRow(ts=ticket.admitted_at, endpoint="chat", status=200, key_id=ticket.principal.key_id,
                    team=ticket.principal.team, prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost)
    store.run_sync(lambda tx: quota.settle(tx, [(ticket, row, now)]))


def refusal(store, who, now, **kw) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as e:
        admit(store, who, now, **kw)
    return e.value


def test_requests_per_minute_bucket(store):
    who = principal(Limits(rpm=3))
    for i in range(3):
        admit(store, who, T0 + i * 0.1)
    e = refusal(store, who, T0 + 0.3)
    assert e.status == 429 and e.code == "requests_per_minute_exceeded"
    # 3 per minute refill one every 20 s; 0.3 s of it has passed
    assert e.retry_after == pytest.approx(20 - 0.3, abs=1e-6)
    assert refusal(store, who, T0 + 19.0).status == 429
    admit(store, who, T0 + 20.01)
    assert refusal(store, who, T0 + 20.02).status == 429


def test_tokens_per_minute_refunds_what_the_worst_case_over_reserved(store):
    who = principal(Limits(tpm=1000))
    assert refusal(store, who, T0, tokens=1001).code == "tokens_per_minute_exceeded"
    first = admit(store, who, T0, tokens=600)
    e = refusal(store, who, T0, tokens=600)
    assert e.retry_after == pytest.approx(200 / (1000 / 60))  # 200 more tokens at 16.7 per second
    settle(store, first, T0, prompt=50, completion=50)  # used 100 of the 600 reserved
    admit(store, who, T0, tokens=600)  # 400 + 500 back = 900 left


def test_parallel_requests_count_live_tickets(store):
    who = principal(Limits(max_parallel=2))
    a = admit(store, who, T0)
    admit(store, who, T0)
    e = refusal(store, who, T0)
    assert e.code == "parallel_requests_exceeded" and e.retry_after == 1.0
    settle(store, a, T0 + 1)
    admit(store, who, T0 + 1)
    assert refusal(store, who, T0 + 2).status == 429
    # tickets of a replica that died without settling expire
    admit(store, who, T0 + quota.TICKET_TTL_S + 2)


def test_budget_reserves_worst_case_and_books_real_cost(store):
    who = principal(Limits(budget_usd=1.0, budget_period="daily"))
    a = admit(store, who, T0, cost=0.4)
    b = admit(store, who, T0, cost=0.4)
    e = refusal(store, who, T0, cost=0.4)  # 0.8 reserved + 0.4 > 1.0
    assert e.status == 402 and e.code == "budget_exceeded" and "daily budget" in e.message
    settle(store, a, T0, cost=0.1)
    settle(store, b, T0, cost=0.1)
    admit(store, who, T0, cost=0.75)  # 0.2 spent + 0.75 fits
    assert refusal(store, who, T0, cost=0.1).status == 402  # 0.2 spent + 0.75 reserved + 0.1 does not
    assert store.run_sync(lambda tx: tx.scalar("SELECT spent_usd FROM spend WHERE scope = 'key:key_a'")) \
        == pytest.approx(0.2)
    admit(store, who, T0 + 86400, cost=0.9)  # a new day, a new budget (the old reservation still counts)


def test_total_budget_never_resets_and_team_budget_covers_all_keys(store):
    team = Limits(budget_usd=0.5, budget_period="total")
    a, b = principal(team=team, key_id="k1"), principal(team=team, key_id="k2")
    settle(store, admit(store, a, T0, cost=0.3), T0, cost=0.3)
    e = refusal(store, b, T0 + 365 * 86400, cost=0.3)
    assert "team 't'" in e.message and "total budget" in e.message


def test_settle_writes_the_ledger_row_once_and_keys_without_limits_skip_the_store(store):
    who = principal()
    ticket = admit(store, who, T0)
    assert not ticket.written and not ticket.scopes
    settle(store, ticket, T0, prompt=7, completion=3, cost=0.01)
    rows = store.run_sync(lambda tx: select(tx))
    assert [(r.prompt_tokens, r.completion_tokens, r.team) for r in rows] == [(7, 3, "t")]


def test_concurrent_admission_from_two_replicas_never_overspends(store_url):
    """Two store instances (two replicas), 4 threads each, racing for a budget of 20 worst cases."""
    stores = [open_store(store_url), open_store(store_url)]
    who = principal(Limits(budget_usd=2.0, budget_period="total", rpm=1000))
    admitted = []
    lock = threading.Lock()

    def worker(store):
        for _ in range(10):
            try:
                t = admit(store, who, T0, cost=0.1)
            except QuotaExceeded:
                continue
            with lock:
                admitted.append(t)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(admitted) == 20  # exactly: 80 tries, 2.0 / 0.1 fit, and the rpm bucket agrees
        level = stores[0].run_sync(lambda tx: tx.scalar("SELECT level FROM rate_buckets WHERE kind = 'rpm'"))
        assert level == pytest.approx(1000 - 20)
    finally:
        for s in stores:
            s.close()


def test_keys_are_stored_hashed_and_revocation_is_immediate(store):
    info, secret = store.run_sync(lambda tx: keys.create_key(tx, team="t", now=T0, limits=Limits(rpm=5)))
    assert secret.startswith(keys.KEY_PREFIX) and info.prefix == secret[:14]
    dump = repr(store.run_sync(lambda tx: tx.fetchall("SELECT * FROM api_keys")))
    assert secret not in dump and keys.hash_key(secret) in dump
    found = store.run_sync(lambda tx: keys.find_principal(tx, keys.hash_key(secret)))
    assert found.key_id == info.id and found.key_limits.rpm == 5 and found.team == "t"
    store.run_sync(lambda tx: keys.set_team(tx, "t", Limits(tpm=100), T0))
    found = store.run_sync(lambda tx: keys.find_principal(tx, keys.hash_key(secret)))
    assert found.team_limits.tpm == 100
    assert store.run_sync(lambda tx: keys.revoke_key(tx, info.id, T0 + 1))
    assert not store.run_sync(lambda tx: keys.revoke_key(tx, info.id, T0 + 2))
    assert store.run_sync(lambda tx: keys.find_principal(tx, keys.hash_key(secret))) is None
    assert not store.run_sync(keys.has_keys)
    assert [k.id for k in store.run_sync(lambda tx: keys.list_keys(tx, "t", include_revoked=True))] == [info.id]


def test_limits_reject_bad_values():
    with pytest.raises(ValueError, match="budget_period"):
        Limits(budget_period="weekly")
    with pytest.raises(ValueError, match="rpm"):
        Limits(rpm=0)


def test_period_keys_are_utc():
    assert quota.period_key("daily", T0) == "d:2026-09-21"
    assert quota.period_key("monthly", T0) == "m:2026-09"
    assert quota.period_key("total", T0) == "total"
