"""Fuzzing every public route of a real server with generated bodies and headers (hypothesis, bounded).

Whatever arrives: no 5xx, `/health` keeps answering within a second, every
answered model request has exactly one ledger row under its request id (and no
id has two), and the server's memory comes back within a bound afterwards.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import API_KEY, MODEL, ServerProc

FIELDS = ["model", "messages", "prompt", "input", "max_tokens", "max_completion_tokens", "n", "temperature",
          "top_p", "top_k", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "seed", "tools",
          "tool_choice", "response_format", "structured_outputs", "logit_bias", "priority", "echo",
          "min_tokens", "stop_token_ids", "role", "content", "tokens", "team", "rpm", "endpoint",
          "input_file_id", "completion_window", "max_reasoning_tokens", "reasoning_effort"]
SCALARS = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, width=32)
           | st.text(max_size=20) | st.sampled_from([MODEL, "user", "assistant", "tool", "json_object", "auto",
                                                   "/v1/chat/completions", "24h", "\ud800"[:0] + "x" * 300]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=5),
                      max_leaves=20)
BODIES = st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=8) | VALUES
VALID = {"/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
         "/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 2}}
ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
          ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info"), ("GET", "/v1/models"),
          ("POST", "/v1/batches"), ("GET", "/v1/batches"), ("GET", "/v1/files"), ("GET", "/v1/usage"),
          ("POST", "/admin/keys"), ("PUT", "/admin/teams/fuzz"), ("GET", "/v2/models/tiny"),
          ("POST", "/v2/models/tiny/infer"), ("GET", "/version"), ("GET", "/v1/deployments")]
MODEL_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", None]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def fuzzed(tiny_llama):
    srv = ServerProc(tiny_llama).wait_ready()
    yield srv
    srv.stop()


def test_no_route_breaks_under_generated_input(fuzzed):
    srv = fuzzed
    client = httpx.Client(base_url=srv.url, timeout=30)
    sent: dict[str, int] = {}   # request id -> status, on model routes
    health_worst = [0.0]
    stop = threading.Event()

    def watch_health() -> None:
        with httpx.Client(base_url=srv.url, timeout=5) as probe:
            while not stop.is_set():
                started = time.perf_counter()
                assert probe.get("/health").status_code == 200
                health_worst[0] = max(health_worst[0], time.perf_counter() - started)
                stop.wait(0.2)

    for _ in range(5):  # warm the server before taking its memory baseline
        client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    baseline = _rss_kib(srv.proc.pid)
    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    counter = [0]

    anything = st.tuples(st.sampled_from(ROUTES), BODIES, st.sampled_from(CONTENT_TYPES),
                         st.sampled_from([True, True, True, False]), st.booleans())
    # a valid model request with random fields added or replaced: most of these reach the model
    plausible = st.sampled_from(sorted(VALID)).flatmap(lambda path: st.tuples(
        st.just(("POST", path)), st.dictionaries(st.sampled_from(FIELDS[5:]), VALUES, max_size=2).map(
            lambda extra: {**VALID[path], **extra}), st.just("application/json"), st.just(True), st.just(False)))

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=anything | plausible)
    def one(case):
        (method, path), body, content_type, keyed, raw = case
        counter[0] += 1
        rid = f"fuzz-{counter[0]}"
        headers = {"X-Request-Id": rid}
        if keyed:
            headers["Authorization"] = f"Bearer {API_KEY}"
        if content_type:
            headers["Content-Type"] = content_type
        payload = json.dumps(body).encode() if not raw else json.dumps(body)[:-1].encode() + b"\xff"
        if method == "GET":
            r = client.request(method, path, headers=headers, params={"model": str(body)[:20]})
        else:
            r = client.request(method, path, headers=headers, content=payload)
        assert r.status_code < 500, (method, path, body, r.status_code, r.text[:300])
        if path in MODEL_ROUTES:
            sent[rid] = r.status_code

    try:
        one()
    finally:
        stop.set()
        watcher.join(5)
    assert health_worst[0] < 1.0, health_worst[0]
    time.sleep(1.0)  # the ledger writes rows in batches after the responses
    with sqlite3.connect(srv.store_path) as db:
        rows = db.execute("SELECT request_id, status FROM ledger WHERE request_id LIKE 'fuzz-%'").fetchall()
    ids = [rid for rid, _ in rows]
    assert len(ids) == len(set(ids)), "a request was metered twice"
    answered = {rid for rid, status in sent.items() if status == 200}
    assert len(answered) >= 10, "too few generated requests reached a model for the ledger check to mean much"
    assert answered <= set(ids), answered - set(ids)
    assert set(ids) <= set(sent)
    assert all(status == sent[rid] for rid, status in rows if sent[rid] == 200)
    assert _rss_kib(srv.proc.pid) - baseline < 300 * 1024, "the server's memory kept growing"
