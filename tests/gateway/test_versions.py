"""Model versions end to end: a real `inferd serve --config` deploying, promoting and rolling back versions.

Version 1 of every group is a mock upstream whose streams can be held open
(`hold_streams`), so requests stay in flight across a deploy or a promotion for as
long as the test needs, with no timing involved; version 2 of `rollout` is a
tiny local Llama, loaded next to it by the running server. Each group belongs to
one test (their order within a test matters, not between tests).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from inferd.store import open_store
from inferd.tenancy import ledger
from tests.api.conftest import ROOT, ServerProc, wait_for
from tests.gateway.mock_upstream import Fault, MockUpstream

CHAT = [{"role": "user", "content": "hello there"}]
WORDS = 6


def remote(mock: MockUpstream, name: str) -> dict:
    return {"provider": "openai", "name": name, "base_url": mock.openai_base_url, "model": mock.model,
            "timeouts": {"connect": 2, "first_token": 60, "total": 120, "stream_silence": 120}}


def group(name: str, deployment: dict, **extra) -> dict:
    return {"name": name, "deployments": [deployment], "retry": {"max_retries": 0},
            "circuit_breaker": {"failure_threshold": 1000, "cooldown_s": 1}, **extra}


@pytest.fixture(scope="module")
def mocks():
    made = {name: MockUpstream(model=f"up-{name}").start() for name in ("one", "bad", "other")}
    made["slow"] = MockUpstream(model="up-slow", latency=0.2).start()
    yield made
    for m in made.values():
        m.stop()


@pytest.fixture(scope="module")
def config(mocks):
    return {"models": [
        group("rollout", remote(mocks["one"], "rollout-one")),
        group("broken", remote(mocks["one"], "broken-one")),
        group("auto", remote(mocks["one"], "auto-one"),
              canary={"min_requests": 6, "max_error_rate_increase": 0.2, "max_ttft_p95_increase": None}),
        group("batch", remote(mocks["slow"], "batch-slow")),
        group("reload", remote(mocks["one"], "reload-one")),
    ]}


@pytest.fixture(scope="module")
def srv(config, tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("versions") / "inferd.yaml"
    path.write_text(yaml.safe_dump(config))
    server = ServerProc(tiny_llama, "--config", str(path), "--versions-poll-s", "0.2", "--batch-concurrency", "1")
    server.config_path = path
    server.wait_ready()
    yield server
    server.stop()


def admin(srv, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, srv.url + path, headers=srv.headers, timeout=300, **kw)


def new_keys(srv, n: int) -> list[str]:
    return [admin(srv, "POST", "/admin/keys", json={"team": "versions"}).json()["key"] for _ in range(n)]


def chat(srv, model: str, key: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or srv.api_key}"}
    return httpx.post(srv.url + "/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": model, "messages": CHAT, "max_tokens": WORDS, "temperature": 0, **kw})


def stream(srv, model: str) -> dict:
    """One streamed answer, read to its end: the version header, the text, how it ended."""
    body = {"model": model, "messages": CHAT, "max_tokens": WORDS, "stream": True}
    text, events, done = "", 0, False
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=srv.headers, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            events += 1
            for choice in chunk.get("choices") or ():
                text += (choice.get("delta") or {}).get("content") or ""
        return {"version": r.headers.get("x-inferd-model-version"), "text": text, "done": done,
                "status": r.status_code}


def describe(srv, model: str) -> dict:
    return admin(srv, "GET", f"/admin/models/{model}").json()


def loaded(card: dict) -> dict[str, dict]:
    return {v["label"]: v for v in card["loaded"]}


def ledger_versions(srv, request_ids: list[str]) -> dict[str, str | None]:
    """The model version each request's ledger row names (waits for the rows: they are written in batches)."""
    def rows():
        store = open_store(f"sqlite:///{srv.store_path}")
        try:
            found = store.run_sync(lambda tx: ledger.select(tx))
        finally:
            store.close()
        by_id = {r.request_id: r.model_version for r in found}
        return by_id if all(i in by_id for i in request_ids) else None
    return wait_for(rows, timeout=10)


def test_canary_beside_running_streams_then_promote_drains_the_old_version(srv, mocks, tiny_llama):
    mocks["one"].hold_streams()
    try:
        with ThreadPoolExecutor(16) as pool:
            streams = [pool.submit(stream, srv, "rollout") for _ in range(16)]
            wait_for(lambda: mocks["one"].held == 16, timeout=60)

            # v2, a local engine, loads next to v1 while its 16 streams are in flight
            r = admin(srv, "POST", "/admin/models/rollout/deploy",
                      json={"spec": {"provider": "local", "model": str(tiny_llama), "engine": {"max_num_seqs": 4}},
                            "canary": 50})
            assert r.status_code == 200, r.text
            card = r.json()
            assert (card["stable"], card["canary"], card["canary_percent"]) == ("v1", "v2", 50)
            assert loaded(card)["v1"]["in_flight"] == 16

            # later requests split by key, each key staying on its version
            keys = new_keys(srv, 16)
            seen: dict[str, set[str]] = {}
            ids: dict[str, str] = {}
            for _ in range(2):
                for key in keys:
                    answer = chat(srv, "rollout", key)
                    assert answer.status_code == 200, answer.text
                    seen.setdefault(key, set()).add(answer.headers["x-inferd-model-version"])
                    ids[answer.headers["x-request-id"]] = answer.headers["x-inferd-model-version"]
            assert all(len(versions) == 1 for versions in seen.values()), seen
            assert {v for versions in seen.values() for v in versions} == {"v1", "v2"}
            found = ledger_versions(srv, list(ids))
            assert {i: found[i] for i in ids} == ids

            # promote: v2 takes every new request, v1 drains with its streams still running
            card = admin(srv, "POST", "/admin/models/rollout/promote").json()
            assert (card["stable"], card["canary"]) == ("v2", None)
            assert loaded(card)["v1"]["draining"] and loaded(card)["v1"]["in_flight"] == 16
            assert {chat(srv, "rollout", key).headers["x-inferd-model-version"] for key in keys} == {"v2"}
            mocks["one"].release_streams()
            answers = [s.result(timeout=60) for s in streams]
    finally:
        mocks["one"].release_streams()
    # none was cut: every stream ran to [DONE] with its whole answer, on the version it started on
    assert all(a["done"] and a["status"] == 200 and a["version"] == "v1" for a in answers), answers
    assert all(len(a["text"].split()) == WORDS for a in answers), answers
    wait_for(lambda: "v1" not in loaded(describe(srv, "rollout")), timeout=30)  # drained, then unloaded

    # a rollback without a canary returns to the version stable before this one
    card = admin(srv, "POST", "/admin/models/rollout/rollback", json={"reason": "compare again"}).json()
    assert card["stable"] == "v1"
    assert chat(srv, "rollout", keys[0]).headers["x-inferd-model-version"] == "v1"
    events = admin(srv, "GET", "/admin/models/rollout/history").json()["data"]
    assert [(e["action"], e["label"]) for e in events][:4] == [
        ("rollback", "v1"), ("promote", "v2"), ("deploy", "v2"), ("config", "v1")]
    assert events[0]["reason"] == "compare again"

    usage = admin(srv, "GET", "/v1/usage", params={"group_by": "served_model,version"}).json()["data"]
    assert {("rollout", "v1"), ("rollout", "v2")} <= {(u["served_model"], u["version"]) for u in usage}


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(srv):
    r = admin(srv, "POST", "/admin/models/broken/deploy",
              json={"spec": {"provider": "local", "model": "/nonexistent/model.gguf"}, "canary": 50})
    assert r.status_code == 422, r.text
    assert "broken@v2 failed to load" in r.json()["error"]["message"]
    card = describe(srv, "broken")
    assert (card["stable"], card["canary"]) == ("v1", None) and list(loaded(card)) == ["v1"]
    assert chat(srv, "broken").headers["x-inferd-model-version"] == "v1"
    last = admin(srv, "GET", "/admin/models/broken/history").json()["data"][0]
    assert (last["action"], last["label"]) == ("load_failed", "v2") and last["reason"]


def test_a_failing_canary_is_rolled_back_automatically(srv, mocks):
    mocks["bad"].set_persistent(Fault.error(500, "broken upstream"))
    try:
        r = admin(srv, "POST", "/admin/models/auto/deploy", json={"spec": remote(mocks["bad"], "auto-bad"),
                                                                   "canary": 50})
        assert r.status_code == 200 and r.json()["canary"] == "v2", r.text
        keys = new_keys(srv, 16)
        answers: dict[str, str] = {}

        def send_until_rolled_back() -> bool:
            for key in keys:
                a = chat(srv, "auto", key)
                assert a.status_code == 200, a.text  # a canary's failure falls over to the stable version
                answers[a.headers["x-request-id"]] = a.headers["x-inferd-model-version"]
            return describe(srv, "auto")["canary"] is None
        wait_for(send_until_rolled_back, timeout=60)
    finally:
        mocks["bad"].clear_faults()
    assert mocks["bad"].count() >= 6  # it was tried, and judged on what it did
    event = admin(srv, "GET", "/admin/models/auto/history").json()["data"][0]
    assert (event["action"], event["label"]) == ("auto_rollback", "v2")
    assert "error rate" in event["reason"]
    # the ledger says which version answered each request: the stable one, for those the canary failed
    found = ledger_versions(srv, list(answers))
    assert {i: found[i] for i in answers} == answers
    assert set(answers.values()) == {"v1"}


def batch(srv, n: int) -> str:
    lines = "\n".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": "batch", "messages": CHAT, "max_tokens": 2}}) for i in range(n))
    f = httpx.post(srv.url + "/v1/files", headers=srv.headers, files={"file": ("in.jsonl", lines.encode())},
                   data={"purpose": "batch"}, timeout=30).json()
    return admin(srv, "POST", "/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions"}
                 ).json()["id"]


def batch_output(srv, batch_id: str) -> list[dict]:
    done = wait_for(lambda: (b := admin(srv, "GET", f"/v1/batches/{batch_id}").json())["status"] == "completed"
                    and b, timeout=120)
    content = admin(srv, "GET", f"/v1/files/{done['output_file_id']}/content").text
    return [json.loads(line) for line in content.splitlines()]


def test_a_batch_stays_on_the_version_it_started_with(srv, mocks):
    first = batch(srv, 8)
    wait_for(lambda: admin(srv, "GET", f"/v1/batches/{first}").json()["request_counts"]["completed"] >= 1,
             timeout=60)
    r = admin(srv, "POST", "/admin/models/batch/deploy", json={"spec": remote(mocks["other"], "batch-other")})
    assert r.status_code == 200 and r.json()["stable"] == "v2", r.text
    assert chat(srv, "batch").headers["x-inferd-model-version"] == "v2"  # interactive requests move at once
    out = batch_output(srv, first)
    assert len(out) == 8 and {line["response"]["model_version"] for line in out} == {"v1"}
    assert {line["response"]["body"]["model"] for line in out} == {"up-slow"}
    later = batch_output(srv, batch(srv, 2))
    assert {line["response"]["model_version"] for line in later} == {"v2"}


def test_config_reload_adds_changes_and_removes_groups_without_cutting_a_stream(srv, config, mocks):
    changed = json.loads(json.dumps(config))
    changed["models"] = [g for g in changed["models"] if g["name"] != "broken"]
    changed["models"].append(group("added", remote(mocks["other"], "added-other")))
    reload = next(g for g in changed["models"] if g["name"] == "reload")
    reload["deployments"] = [remote(mocks["other"], "reload-other")]
    mocks["one"].hold_streams()
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(stream, srv, "reload")
            wait_for(lambda: mocks["one"].held == 1, timeout=60)
            srv.config_path.write_text(yaml.safe_dump(changed))
            report = admin(srv, "POST", "/admin/config/reload").json()
            assert report["added"] == ["added"] and report["removed"] == ["broken"], report
            assert "reload" in report["changed"] and not report["failed"], report
            models = {m["id"] for m in admin(srv, "GET", "/v1/models").json()["data"]}
            assert {"added", "reload"} <= models and "broken" not in models
            assert chat(srv, "added").status_code == 200
            assert chat(srv, "broken").status_code == 404
            now = chat(srv, "reload")
            assert now.headers["x-inferd-model-version"] == "v2" and now.json()["model"] == "up-other"
            mocks["one"].release_streams()
            held = running.result(timeout=60)
    finally:
        mocks["one"].release_streams()
    assert held["done"] and held["version"] == "v1" and len(held["text"].split()) == WORDS

    # SIGHUP does the same; an invalid file changes nothing
    srv.config_path.write_text("models: [{name: 1}]")
    srv.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)  # not an assertion: gives the server the moment it needs to read the bad file
    assert chat(srv, "added").status_code == 200
    changed["models"] = [g for g in changed["models"] if g["name"] != "added"]
    srv.config_path.write_text(yaml.safe_dump(changed))
    srv.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: chat(srv, "added").status_code == 404, timeout=30)
    assert admin(srv, "POST", "/admin/models/reload/deploy", json={"spec": []}).status_code == 400
    assert httpx.get(srv.url + "/health", timeout=5).status_code == 200


def cli(srv, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.cli", "models", *args, "--base-url", srv.url,
                           "--api-key", srv.api_key], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_the_models_command(srv, mocks):  # each call is a new process: a few seconds apiece
    spec = json.dumps(remote(mocks["other"], "cli-other"))
    out = cli(srv, "deploy", "rollout", spec, "--canary", "25", "--label", "other")
    assert out.returncode == 0, out.stderr
    assert "canary other (25% of keys)" in out.stdout
    assert cli(srv, "promote", "rollout").returncode == 0
    history = cli(srv, "history", "rollout").stdout.splitlines()
    assert "promote" in history[0] and "-> other" in history[0] and "(25%)" in history[1]
    bad = cli(srv, "deploy", "rollout", "{provider: openai}")
    assert bad.returncode == 2 and "base_url: Field required" in bad.stderr  # the server's 400, said
