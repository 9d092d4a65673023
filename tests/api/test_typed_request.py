"""One typed request from the edge to the engine: edge values mean the same everywhere, and one
request id joins the response, the ledger row and the engine's log line."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest

from inferd.providers.anthropic import to_messages_request
from inferd.tenancy.estimate import output_bound
from inferd.wire.errors import InferdError
from tests.api.conftest import MODEL, ServerProc, wait_for
from tests.typed import typed

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "count with me"}]}
ANTHROPIC_DEFAULT = 4096
GROUP_DEFAULT = 777


def _post(server, path: str, body: dict, **headers) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={**server.headers, **headers}, timeout=60)


@pytest.mark.parametrize("fields", [{"max_tokens": 0}, {"max_completion_tokens": 0}, {"max_tokens": -1},
                                    {"max_completion_tokens": -5, "max_tokens": 5}, {"max_tokens": 2**31}])
def test_out_of_range_chat_limits_are_the_same_400_at_the_edge_and_below_it(server, fields):
    """The estimate, the Anthropic translation and the engine only ever see parsed requests, so the
    edge's 400 is the answer for all of them."""
    body = {**CHAT, **fields}
    with pytest.raises(InferdError) as parsed:
        typed("chat", body)
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == parsed.value.status == 400
    assert r.json()["error"]["param"] == parsed.value.param == next(iter(fields))


@pytest.mark.parametrize("fields,limit", [({"max_tokens": 9, "max_completion_tokens": 3}, 3),
                                          ({"max_completion_tokens": 4}, 4), ({"max_tokens": 2}, 2),
                                          ({"max_tokens": None, "max_completion_tokens": 3}, 3)])
def test_a_chat_limit_means_the_same_in_the_estimate_the_translation_and_the_engine(server, fields, limit):
    body = {**CHAT, **fields}
    request = typed("chat", body)
    assert output_bound(request, GROUP_DEFAULT) == limit
    assert to_messages_request(request.body, "claude", ANTHROPIC_DEFAULT)["max_tokens"] == limit
    answer = _post(server, "/v1/chat/completions", {**body, "ignore_eos": True}).json()
    assert answer["usage"]["completion_tokens"] == limit
    assert answer["choices"][0]["finish_reason"] == "length"


def test_no_chat_limit_is_each_layers_default(server):
    request = typed("chat", CHAT)
    assert output_bound(request, GROUP_DEFAULT) == GROUP_DEFAULT
    assert to_messages_request(request.body, "claude", ANTHROPIC_DEFAULT)["max_tokens"] == ANTHROPIC_DEFAULT
    assert request.body.output_limit is None  # the engine: up to the context length


@pytest.mark.parametrize("max_tokens,expected", [(0, 0), (3, 3), (None, 16)])
def test_a_completion_limit_means_the_same_in_the_estimate_and_the_engine(server, max_tokens, expected):
    """0 is a real request (prompt logprobs only), and an unset limit is OpenAI's 16 in both."""
    body = {"model": MODEL, "prompt": "one two three", "max_tokens": max_tokens, "ignore_eos": True,
            "echo": True, "logprobs": 1}
    assert output_bound(typed("completions", body), GROUP_DEFAULT) == expected
    answer = _post(server, "/v1/completions", body).json()
    assert answer["usage"]["completion_tokens"] == expected


@pytest.fixture(scope="module")
def debug_server(tiny_llama):
    srv = ServerProc(tiny_llama, log_level="debug").wait_ready()
    yield srv
    srv.stop()


def _ledger_rows(server, request_id: str) -> list[tuple]:
    with sqlite3.connect(server.store_path) as db:
        return db.execute("SELECT request_id, status, completion_tokens FROM ledger WHERE request_id = ?",
                          (request_id,)).fetchall()


@pytest.mark.parametrize("stream", [False, True])
def test_one_request_id_in_the_response_the_ledger_and_the_engine_log(debug_server, stream):
    rid = f"trace-{int(time.time() * 1000)}-{int(stream)}"
    body = {**CHAT, "max_tokens": 3, "ignore_eos": True, "stream": stream}
    r = _post(debug_server, "/v1/chat/completions", body, **{"X-Request-Id": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    if stream:
        chunks = [json.loads(line[len("data: "):]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        assert chunks and {c["id"] for c in chunks} == {f"chatcmpl-{rid}"}
    else:
        assert r.json()["id"] == f"chatcmpl-{rid}"
    assert wait_for(lambda: _ledger_rows(debug_server, rid)) == [(rid, 200, 3)]
    wait_for(lambda: f"request {rid} finished" in debug_server.output())


def test_a_reused_request_id_still_runs_both_requests(debug_server):
    """Clients may reuse an id while its first request runs; the engine keeps the two apart."""
    import concurrent.futures

    rid = f"reused-{int(time.time() * 1000)}"
    body = {**CHAT, "max_tokens": 8, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: _post(debug_server, "/v1/chat/completions", body,
                                                **{"X-Request-Id": rid}), range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json()["usage"]["completion_tokens"] for a in answers] == [8, 8]
    assert wait_for(lambda: len(_ledger_rows(debug_server, rid)) == 2)
