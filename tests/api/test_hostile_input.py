"""Hostile and careless input against a real server: a clear 4xx, and the server keeps serving.

Each test is the regression test of one defect seen against an earlier server:
negative token counts that drained a team's token bucket, a non-string
embeddings model that stalled the ledger, tokenizer routes open without a key,
cross-site `text/plain` posts parsed as JSON, bodies of any size, and 500s for
deep nesting and lone surrogates (after which the keep-alive connection was
dropped).
"""

from __future__ import annotations

import time

import httpx
import pytest

from inferd.providers.anthropic import to_messages_request
from inferd.tenancy.estimate import output_bound
from inferd.wire.schema import ChatCompletionRequest
from tests.api.conftest import MODEL
from tests.typed import typed

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as c:
        yield c


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "max_tokens": -(2**31) + 1}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -5, "max_tokens": 5}, "max_completion_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, "max_tokens"),
])
def test_token_counts_out_of_bounds_are_400_and_take_nothing(client, path, body, param):
    assert_error(client.post(path, json=body), 400, param)
    ok = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_zero_and_precedence_mean_the_same_in_the_estimate_the_engine_and_the_anthropic_translation():
    both = {**CHAT, "max_tokens": 9, "max_completion_tokens": 5}
    assert ChatCompletionRequest.model_validate(both).output_limit == 5
    assert output_bound(typed("chat", both)) == 5
    assert to_messages_request(typed("chat", both).body, "claude", 4096)["max_tokens"] == 5
    unset = dict(CHAT)
    assert ChatCompletionRequest.model_validate(unset).output_limit is None
    assert output_bound(typed("chat", unset), 777) == 777
    assert to_messages_request(typed("chat", unset).body, "claude", 4096)["max_tokens"] == 4096
    # a completion may ask for 0 tokens (prompt logprobs only): 0 is reserved, not the default
    assert output_bound(typed("completions", {"prompt": "x", "max_tokens": 0}), 777) == 0


def requests_metered(client) -> int:
    r = client.get("/v1/usage", params={"group_by": "endpoint"})
    assert r.status_code == 200, r.text
    return sum(g["requests"] for g in r.json()["data"])


def test_a_non_string_embeddings_model_is_400_and_the_server_keeps_metering(client):
    before = requests_metered(client)
    for model in ({}, [], 5, True):
        assert_error(client.post("/v1/embeddings", json={"model": model, "input": "hi"}), 400, "model")
    for _ in range(3):
        assert client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}).status_code == 200
    assert requests_metered(client) == before + 3  # the ledger still writes, the refused bodies never reached it


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/tokenize", {"model": MODEL, "prompt": "hi"}),
    ("POST", "/detokenize", {"model": MODEL, "tokens": [1, 2]}),
    ("GET", "/tokenizer_info", None),
])
def test_tokenizer_routes_need_the_key(server, method, path, body):
    r = httpx.request(method, server.url + path, json=body)
    assert_error(r, 401)
    assert httpx.request(method, server.url + path, json=body, headers=server.headers).status_code == 200


def test_a_cross_site_text_plain_post_is_not_parsed_as_json(client):
    r = client.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": []}',
                    headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert_error(r, 415)["code"] == "unsupported_media_type"
    r = client.post("/admin/keys", content=b'{"team": "evil"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def test_a_body_over_the_limit_is_413_and_the_server_stays_up(client):
    prompt = "a" * (9 * 2**20)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    assert_error(r, 413)["code"] == "request_too_large"
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("content", [
    b'{"model": "tiny", "prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"model": "tiny", "prompt": ' + b"[" * 100 + b"]" * 100 + b"}",
    b'{"model": "tiny", "prompt": "bad \\ud800 text", "max_tokens": 1}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
])
def test_deep_nesting_and_lone_surrogates_are_400_on_a_kept_connection(client, content):
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        r = client.post(path, content=content, headers={"Content-Type": "application/json"})
        assert_error(r, 400)
        assert r.headers.get("connection", "").lower() != "close"
    assert client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}).status_code == 200


def test_batch_lines_split_at_newlines_only_and_refuse_lone_surrogates():
    import json

    from inferd.batch.files import parse_batch_input

    def line(custom_id: str, content: str) -> str:
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": MODEL, "messages": [{"role": "user", "content": content}]}},
                          ensure_ascii=False)

    parsed = parse_batch_input(line("a", "one\u2028two") + "\n" + line("b", "x\u0085y") + "\r\n")
    assert [p.custom_id for p in parsed] == ["a", "b"]
    assert parsed[0].body["messages"][0]["content"] == "one\u2028two"
    with pytest.raises(ValueError, match="line 2: contains a lone UTF-16 surrogate"):
        parse_batch_input(line("a", "ok") + "\n" + line("b", "ok").replace('"b"', '"\\ud800"'))
    deep = line("c", "ok").replace('"ok"', "[" * 5000 + "]" * 5000)  # json.loads recursed past its limit
    with pytest.raises(ValueError, match="line 1: nested more than 64 levels deep"):
        parse_batch_input(deep)


def test_a_prompt_sure_to_exceed_the_context_is_refused_before_tokenizing(client):
    for path, body in [("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 2_000_000}]}),
                       ("/v1/completions", {"model": MODEL, "prompt": "y" * 2_000_000})]:
        started = time.perf_counter()
        r = client.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert time.perf_counter() - started < 5


def test_stop_strings_are_bounded(client):
    for stop in (["s"] * 65, "x" * 513, [""]):
        r = client.post("/v1/chat/completions", json={**CHAT, "stop": stop, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text


def test_an_open_server_keeps_admin_closed_unless_allowed_on_loopback(tiny_llama, tmp_path):
    from tests.api.conftest import ServerProc

    closed = ServerProc(tiny_llama, api_key=None).wait_ready()
    try:
        assert httpx.post(closed.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 1}).status_code == 200
        r = httpx.post(closed.url + "/admin/keys", json={"team": "evil"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_closed"
        assert httpx.get(closed.url + "/admin/keys").status_code == 403
    finally:
        closed.stop()
    allowed = ServerProc(tiny_llama, "--allow-open-admin", api_key=None).wait_ready()
    try:
        r = httpx.post(allowed.url + "/admin/keys", json={"team": "ops"})  # from loopback
        assert r.status_code == 201, r.text
        key = r.json()["key"]
        # the server has a key now, so it is no longer open
        assert httpx.post(allowed.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 1}).status_code == 401
        ok = httpx.post(allowed.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 1},
                        headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    finally:
        allowed.stop()


def test_the_admin_key_can_come_from_a_file(tiny_llama, tmp_path):
    from tests.api.conftest import ServerProc

    path = tmp_path / "admin.key"
    path.write_text("from-a-file\n")
    srv = ServerProc(tiny_llama, "--api-key-file", str(path), api_key=None).wait_ready()
    try:
        assert httpx.get(srv.url + "/admin/keys", headers={"Authorization": "Bearer from-a-file"}).status_code == 200
        assert httpx.get(srv.url + "/admin/keys", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert "from-a-file" not in " ".join(srv.proc.args)
    finally:
        srv.stop()
