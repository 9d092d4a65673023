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

import json
import os
import signal
from collections import Counter

import httpx
import openai
import pytest

from tests.api.conftest import wait_for
from tests.batch.test_batch_durability import assert_answered_and_billed_once, submit_completions
from tests.ray_fixtures import ray_cluster, serve_on_ray  # noqa: F401 - the fixture

LINES = 160
TOKENS = 48  # long enough that the three quarters after the first take longer than one poll


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
    batch = submit_completions(c, LINES, TOKENS)
    pool = httpx.get(srv.url + "/admin/replicas/tiny-ray", headers=srv.headers, timeout=10).json()
    victim = pool["data"][0]["placement"]["pid"]
    os.kill(victim, signal.SIGSTOP)  # frozen with its lines in flight, then gone
    os.kill(victim, signal.SIGKILL)
    done_at_kill = c.batches.retrieve(batch.id).request_counts.completed
    assert done_at_kill < LINES, "the batch finished before the kill; make it longer"

    final = wait_for(lambda: (b := c.batches.retrieve(batch.id)).status == "completed" and b, timeout=180)
    assert final.request_counts.completed == LINES and final.request_counts.failed == 0
    out = [json.loads(x) for x in c.files.content(final.output_file_id).text.splitlines()]
    rows = assert_answered_and_billed_once(srv.store_url, batch.id, out, LINES, TOKENS)
    by_replica = Counter(r.deployment for r in rows)
    assert set(by_replica) == {"tiny-ray#0", "tiny-ray#1"}, by_replica  # the batch ran on both at once
    # the killed replica was replaced by a new actor
    wait_for(lambda: httpx.get(srv.url + "/admin/replicas/tiny-ray", headers=srv.headers, timeout=10).json()
             ["data"][0]["placement"]["restarts"] == 1, timeout=60)
