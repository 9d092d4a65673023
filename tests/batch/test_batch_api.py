"""The Batch API through the official `openai` SDK against a real server: files, batches, results, billing.

The server runs a tiny local Llama priced in its config. Tests cover the whole
lifecycle (upload, create, poll, read output), partial failures (lines whose
requests are invalid land in the error file, the others in the output file),
cancellation, expiry with a short window, pagination, validation that names the
bad line, team scoping, and that each line is billed once at the batch discount.
"""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest
import yaml

from inferd.store import open_store
from inferd.tenancy import ledger
from tests.api.conftest import ServerProc, wait_for

ADMIN = "batch-admin"
PRICE = {"input": 100.0, "output": 1000.0, "batch_discount": 0.5}


@pytest.fixture(scope="module")
def srv(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    config = {"models": [{"name": "tiny", "price": PRICE,
                          "deployments": [{"provider": "local", "model": str(tiny_llama)}]}]}
    (tmp / "inferd.yaml").write_text(yaml.safe_dump(config))
    server = ServerProc(tiny_llama, "--config", str(tmp / "inferd.yaml"), "--store", f"sqlite:///{tmp}/s.db",
                        "--batch-concurrency", "4", api_key=ADMIN).wait_ready()
    server.store_url = f"sqlite:///{tmp}/s.db"
    yield server
    server.stop()


def client(srv, key: str = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def team_key(srv, team: str) -> str:
    r = httpx.post(srv.url + "/admin/keys", json={"team": team}, headers={"Authorization": f"Bearer {ADMIN}"})
    return r.json()["key"]


def jsonl(lines: list[dict]) -> bytes:
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def chat_line(i: int, max_tokens: int = 4, **body) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": f"line {i}"}],
                     "max_tokens": max_tokens, "ignore_eos": True, **body}}


def wait_done(c: openai.OpenAI, batch_id: str, timeout: float = 60):
    return wait_for(lambda: (b := c.batches.retrieve(batch_id)).status in ("completed", "expired", "cancelled",
                                                                            "failed") and b, timeout=timeout)


def read_jsonl(c: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines() if x]


def test_lifecycle_with_partial_failures_and_billing(srv):
    key = team_key(srv, "batch-team")
    c = client(srv, key)
    lines = [chat_line(i, max_tokens=3 + i % 3) for i in range(12)]
    lines[4]["body"]["temperature"] = -1          # invalid: a 400 for that line only
    lines[9]["body"]["model"] = "no-such-model"   # 404 for that line only
    f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(jsonl(lines))
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata={"job": "nightly"})
    assert batch.status == "in_progress" and batch.request_counts.total == 12 and batch.metadata == {"job": "nightly"}
    done = wait_done(c, batch.id)
    assert done.status == "completed" and done.completed_at and done.request_counts.completed == 10
    assert done.request_counts.failed == 2
    out, err = read_jsonl(c, done.output_file_id), read_jsonl(c, done.error_file_id)
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(12) if i not in (4, 9)]
    assert sorted((e["custom_id"], e["response"]["status_code"]) for e in err) == [("req-4", 400), ("req-9", 404)]
    for o in out:
        i = int(o["custom_id"].split("-")[1])
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert o["response"]["body"]["usage"]["completion_tokens"] == 3 + i % 3
    # billed once per answered line, at half price, to the team that created the batch
    store = open_store(srv.store_url)
    try:
        wait_for(lambda: len(store.run_sync(lambda tx: ledger.select(tx, "batch_id = ?", (batch.id,)))) == 12)
        rows = store.run_sync(lambda tx: ledger.select(tx, "batch_id = ?", (batch.id,)))
    finally:
        store.close()
    assert {r.team for r in rows} == {"batch-team"}
    billed = {r.request_id: r for r in rows if r.status == 200}
    assert len(billed) == 10
    for o in out:
        row = billed[o["response"]["request_id"]]
        assert o["id"] == o["response"]["request_id"]  # one id: the line's, the ledger row's, the body's
        assert o["response"]["body"]["id"].endswith("-" + row.request_id)
        usage = o["response"]["body"]["usage"]
        assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
        full = (usage["prompt_tokens"] * PRICE["input"] + usage["completion_tokens"] * PRICE["output"]) / 1e6
        assert row.cost_usd == pytest.approx(full / 2)
    # another team sees neither the batch nor its files
    other = client(srv, team_key(srv, "other-team"))
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)
    assert batch.id not in [b.id for b in other.batches.list()]


def test_bad_input_file_names_the_line(srv):
    c = client(srv)
    bad = jsonl([chat_line(0), chat_line(0)])  # duplicate custom_id on line 2
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="batch")
    assert "line 2" in str(e.value) and "req-0" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="line 1"):
        c.files.create(file=("bad.jsonl", io.BytesIO(b"{not json}\n")), purpose="batch")
    f = c.files.create(file=("ok.jsonl", io.BytesIO(jsonl([chat_line(0)]))), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="line 1"):
        c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")


def test_cancel_keeps_what_completed(srv):
    c = client(srv)
    f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line(i, 60) for i in range(40)]))),
                       purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: c.batches.retrieve(batch.id).request_counts.completed >= 2, timeout=60)
    assert c.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_done(c, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    out, err = read_jsonl(c, done.output_file_id), read_jsonl(c, done.error_file_id)
    assert len(out) == done.request_counts.completed >= 2 and len(out) < 40
    assert len(out) + len(err) == 40  # every line once: answered, or cancelled before it ran
    assert {e["error"]["code"] for e in err} == {"batch_cancelled"}
    assert c.batches.cancel(batch.id).status == "cancelled"  # cancelling twice is harmless


def test_a_completed_batch_cannot_be_cancelled(srv):
    c = client(srv)
    f = c.files.create(file=("one.jsonl", io.BytesIO(jsonl([chat_line(0)]))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_done(c, b.id).status == "completed"
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(b.id)


def test_expiry_returns_what_completed(srv):
    c = client(srv)
    # a few quick lines first, so some are done whatever the machine's load; then far more work than
    # the window (200 x 400 tokens, 4 lines at a time: tens of seconds on the fastest machine)
    lines = [chat_line(i, 1 if i < 3 else 400) for i in range(200)]
    f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="3s")
    done = wait_done(c, batch.id, timeout=60)
    assert done.status == "expired" and done.expired_at, (done.request_counts, done.completed_at - done.created_at)
    out, err = read_jsonl(c, done.output_file_id), read_jsonl(c, done.error_file_id)
    assert 3 <= len(out) < 200 and len(out) + len(err) == 200
    assert {e["error"]["code"] for e in err} == {"batch_expired"}


def test_list_pagination_and_files_api(srv):
    c = client(srv, team_key(srv, "pager"))
    ids = []
    for i in range(3):
        f = c.files.create(file=(f"p{i}.jsonl", io.BytesIO(jsonl([chat_line(i, 1)]))), purpose="batch")
        ids.append(c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                    completion_window="24h").id)
        time.sleep(0.01)
    first = c.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    second = c.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == [ids[0]] and not second.has_more
    assert [b.id for b in c.batches.list()] == ids[::-1]  # the SDK's auto-pagination
    f = c.files.retrieve(c.batches.retrieve(ids[0]).input_file_id)
    assert f.filename == "p0.jsonl"
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_cli_submit_wait_and_results(srv, tmp_path):
    import subprocess
    import sys

    from tests.api.conftest import ROOT

    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([chat_line(i, 2) for i in range(5)]))
    env = {**__import__("os").environ, "INFERD_BASE_URL": srv.url, "INFERD_API_KEY": ADMIN}

    def cli(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "inferd.cli", "batch", *args], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=120)

    submitted = cli("submit", str(path), "--wait")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.splitlines()[0]
    assert "completed" in submitted.stdout and "5/5 done" in submitted.stdout
    assert "completed" in cli("status", batch_id).stdout
    out = tmp_path / "out.jsonl"
    assert cli("results", batch_id, "-o", str(out)).returncode == 0
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == [f"req-{i}" for i in range(5)]
    bad = cli("status", "batch_nope")
    assert bad.returncode == 2 and "404" in bad.stderr



def test_a_teams_batch_spends_its_budget_and_leaves_nothing_reserved(srv):
    """Batch lines count against the team's budget (not its rate limits: the runner paces them), and each
    line's reservation is settled with its ledger row."""
    r = httpx.put(srv.url + "/admin/teams/budgeted", json={"budget_usd": 1000, "max_parallel": 1, "rpm": 1},
                  headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    c = client(srv, team_key(srv, "budgeted"))
    lines = [chat_line(i) for i in range(6)] + [chat_line(6, max_tokens=-3)]  # the last one fails
    upload = c.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = wait_done(c, c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                          completion_window="24h").id)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (6, 1)  # rpm 1 did not refuse them
    store = open_store(srv.store_url)
    try:
        def settled():
            rows = store.run_sync(lambda tx: ledger.select(tx, "batch_id = ?", (batch.id,)))
            tickets = store.run_sync(lambda tx: tx.scalar("SELECT COUNT(*) FROM tickets WHERE team_scope = ?",
                                                           ("team:budgeted",)))
            spent = store.run_sync(lambda tx: tx.scalar("SELECT COALESCE(SUM(spent_usd), 0) FROM spend "
                                                         "WHERE scope = ?", ("team:budgeted",)))
            return len(rows) == 7 and tickets == 0 and (rows, spent)
        rows, spent = wait_for(settled)
    finally:
        store.close()
    assert spent > 0 and spent == pytest.approx(sum(r.cost_usd for r in rows))
