"""A batch job runs over every Ray replica at once, and a replica killed midway costs nothing twice.

`inferd serve` in front of a real local Ray cluster (tests/ray_fixtures.py) with
a `provider: ray` deployment of two replicas of the tiny Llama. A batch of short
completions runs through the server's batch runner, whose lines the gateway
spreads over both replicas; a quarter of the way in, one replica's actor process
is killed with SIGKILL. Lines it had in flight fail there, are retried on the
other replica, and the batch completes: every custom_id is in the output once,
the ledger has one row per line, each for a request id in the output, and both
replicas answered lines.
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections import Counter

import httpx
import openai
import pytest

from inferd.store import open_store
from inferd.tenancy import ledger
from tests.api.conftest import wait_for
from tests.ray_fixtures import ray_cluster, serve_on_ray  # noqa: F401 - the fixture

LINES = 160


@pytest.fixture(scope="module")
def batch_server(ray_cluster, tiny_llama, tmp_path_factory):  # noqa: F811 - the fixture
    tmp = tmp_path_factory.mktemp("ray-batch")
    srv = serve_on_ray(ray_cluster, tiny_llama, tmp, "--store", f"sqlite:///{tmp}/store.db",
                       "--batch-concurrency", "16", "--batch-lease-s", "5")
    srv.store_url = f"sqlite:///{tmp}/store.db"
    yield srv
    srv.stop()


def test_a_batch_over_both_replicas_answers_and_bills_every_line_once(batch_server):
    srv = batch_server
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.api_key, max_retries=0)
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny", "prompt": f"item {i}", "max_tokens": 8, "ignore_eos": True}}
             for i in range(LINES)]
    content = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
    f = c.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    wait_for(lambda: c.batches.retrieve(batch.id).request_counts.completed >= LINES // 4, timeout=120)
    pool = httpx.get(srv.url + "/admin/replicas/tiny-ray", headers=srv.headers, timeout=10).json()
    victim = pool["data"][0]["placement"]["pid"]
    os.kill(victim, signal.SIGSTOP)  # frozen with its lines in flight, then gone
    os.kill(victim, signal.SIGKILL)
    done_at_kill = c.batches.retrieve(batch.id).request_counts.completed
    assert done_at_kill < LINES, "the batch finished before the kill; make it longer"

    final = wait_for(lambda: (b := c.batches.retrieve(batch.id)).status == "completed" and b, timeout=180)
    assert final.request_counts.completed == LINES and final.request_counts.failed == 0
    out = [json.loads(x) for x in c.files.content(final.output_file_id).text.splitlines()]
    ids = Counter(o["custom_id"] for o in out)
    assert sorted(ids) == sorted(f"line-{i}" for i in range(LINES)) and set(ids.values()) == {1}

    store = open_store(srv.store_url)
    try:
        rows = store.run_sync(lambda tx: ledger.select(tx, "batch_id = ?", (batch.id,)))
    finally:
        store.close()
    billed = Counter(r.request_id for r in rows)
    assert len(rows) == LINES and set(billed.values()) == {1}
    assert set(billed) == {o["response"]["request_id"] for o in out}
    assert sum(r.completion_tokens for r in rows) == 8 * LINES
    by_replica = Counter(r.deployment for r in rows)
    assert set(by_replica) == {"tiny-ray#0", "tiny-ray#1"}, by_replica  # the batch ran on both at once
    # the killed replica was replaced by a new actor
    wait_for(lambda: httpx.get(srv.url + "/admin/replicas/tiny-ray", headers=srv.headers, timeout=10).json()
             ["data"][0]["placement"]["restarts"] == 1, timeout=60)
