"""A batch survives `kill -9`: every line answered exactly once and billed exactly once.

A server starts a batch of 300 short requests; once part of it is done, the
server is killed with SIGKILL (no shutdown of any kind). A new server on the
same store picks the batch up (lines the dead one had claimed come back when
their 2 s leases run out) and finishes it. The output file then has each
custom_id once, and the ledger has one row per line, each for a request id
that is in the output.
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections import Counter

import openai
import pytest

from inferd.store import open_store
from inferd.tenancy import ledger
from tests.api.conftest import ServerProc, wait_for

LINES = 300


def start(tiny_llama, store_url: str) -> ServerProc:
    return ServerProc(tiny_llama, "--store", store_url, "--batch-lease-s", "2", "--batch-concurrency", "8",
                      api_key=None).wait_ready()


def submit_completions(c: openai.OpenAI, lines: int, max_tokens: int):
    """A batch of `lines` completions of exactly `max_tokens` tokens (custom ids line-0, line-1, ...), once a
    quarter of it is done."""
    body = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "tiny", "prompt": f"item {i}", "max_tokens": max_tokens, "ignore_eos": True}}
            for i in range(lines)]
    content = ("\n".join(json.dumps(x) for x in body) + "\n").encode()
    f = c.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    wait_for(lambda: c.batches.retrieve(batch.id).request_counts.completed >= lines // 4, timeout=120)
    return batch


def assert_answered_and_billed_once(store_url: str, batch_id: str, out: list[dict], lines: int,
                                    max_tokens: int) -> list[ledger.LedgerRow]:
    """Every line is in the output once and in the ledger once, for the request the output names; the rows."""
    ids = Counter(o["custom_id"] for o in out)
    assert sorted(ids) == sorted(f"line-{i}" for i in range(lines)) and set(ids.values()) == {1}
    store = open_store(store_url)
    try:
        rows = store.run_sync(lambda tx: ledger.select(tx, "batch_id = ?", (batch_id,)))
    finally:
        store.close()
    billed = Counter(r.request_id for r in rows)
    assert len(rows) == lines and set(billed.values()) == {1}
    assert set(billed) == {o["response"]["request_id"] for o in out}
    assert sum(r.completion_tokens for r in rows) == max_tokens * lines
    return rows


def test_kill_9_midway_then_resume(tiny_llama, tmp_path):
    store_url = f"sqlite:///{tmp_path}/store.db"
    srv = start(tiny_llama, store_url)
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    batch = submit_completions(c, LINES, 2)
    done_before = c.batches.retrieve(batch.id).request_counts.completed
    # kill while the server holds claimed lines: freeze it (SIGSTOP) so that it cannot finish them between the
    # look and the kill, and let it run on when it happens to hold none (between claims)
    store = open_store(store_url)
    try:
        core = srv.core_pid()

        def frozen_holding_lines() -> bool:
            srv.proc.send_signal(signal.SIGSTOP)
            held = store.run_sync(lambda tx: tx.scalar(
                "SELECT COUNT(*) FROM batch_lines WHERE batch_id = ? AND state = 'running'", (batch.id,)))
            if not held:
                srv.proc.send_signal(signal.SIGCONT)
            return held > 0

        wait_for(frozen_holding_lines, timeout=30)
        srv.proc.send_signal(signal.SIGKILL)
    finally:
        store.close()
    srv.proc.wait()
    wait_for(lambda: not os.path.exists(f"/proc/{core}") or "Z" in open(f"/proc/{core}/stat").read().split()[2],
             timeout=10)  # the orphaned engine core notices and exits
    assert done_before < LINES, "the batch finished before the kill; make it longer"

    srv = start(tiny_llama, store_url)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        final = wait_for(lambda: (b := c.batches.retrieve(batch.id)).status == "completed" and b, timeout=180)
        assert final.request_counts.completed == LINES and final.request_counts.failed == 0
        out = [json.loads(x) for x in c.files.content(final.output_file_id).text.splitlines()]
    finally:
        srv.stop()
    assert_answered_and_billed_once(store_url, batch.id, out, LINES, 2)
    store = open_store(store_url)
    try:
        attempts = store.run_sync(lambda tx: tx.scalar("SELECT MAX(attempts) FROM batch_lines WHERE batch_id = ?",
                                                       (batch.id,)))
    finally:
        store.close()
    assert attempts >= 2  # some lines were claimed by the killed server and run again
