"""Two `inferd serve` replicas sharing one PostgreSQL store: limits and the ledger are global.

A key with a limit of 10 requests per minute sends 30 requests alternating
between the replicas: exactly 10 get through (a replica counting on its own
would let 20 pass), and either replica's /v1/usage shows the ledger of both.
"""

from __future__ import annotations

import time

import httpx
import pytest

from inferd.store import open_store
from inferd.tenancy import keys
from inferd.tenancy.keys import Limits
from tests.api.conftest import ServerProc, wait_for

RPM = 10


@pytest.fixture(scope="module")
def replicas(tiny_llama, postgres_server):
    url = postgres_server.new_database()
    store = open_store(url)
    _, secret = store.run_sync(lambda tx: keys.create_key(tx, team="shared", now=time.time(),
                                                          limits=Limits(rpm=RPM)))
    store.close()
    servers = [ServerProc(tiny_llama, "--store", url, api_key=None) for _ in range(2)]
    for s in servers:
        s.wait_ready()
    yield servers, secret
    for s in servers:
        s.stop()


def test_rate_limit_holds_across_replicas(replicas):
    servers, secret = replicas
    headers = {"Authorization": f"Bearer {secret}"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    started = time.monotonic()
    codes = [httpx.post(servers[i % 2].url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
             .status_code for i in range(3 * RPM)]
    elapsed = time.monotonic() - started
    refilled = int(elapsed * RPM / 60)  # one request back every 6 s
    assert codes.count(200) == RPM + refilled, (codes, elapsed)
    assert set(codes) == {200, 429}
    assert codes[:RPM] == [200] * RPM  # both replicas admitted from the same bucket until it was empty
    for s in servers:  # the ledger is shared: each replica reports both replicas' requests (the other's
        # last rows land within its flush interval)
        wait_for(lambda: httpx.get(s.url + "/v1/usage", headers=headers).json()["data"][0]["requests"] == 3 * RPM,
                 timeout=5)
