"""OpenAICompatDeployment against the mock upstream: answers, streams, and every fault classified in time."""

from __future__ import annotations

import dataclasses
import email.utils
import socket
import time

import pytest

from inferd.providers.base import Timeouts
from inferd.providers.openai_compat import OpenAICompatConfig, OpenAICompatDeployment
from inferd.wire.errors import ErrorKind
from tests.gateway.mock_upstream import WORDS, Fault
from tests.providers.conftest import FAST, UPSTREAM_MODEL, collect, fails, run
from tests.typed import typed

CHAT = {"model": "public-name", "max_tokens": 4, "messages": [{"role": "user", "content": "say four words"}]}
REPLY = " ".join(WORDS[:4])


def deployment(mock, timeouts: Timeouts = FAST, **config):
    def make() -> OpenAICompatDeployment:
        base = {"name": "remote", "base_url": mock.openai_base_url, "model": UPSTREAM_MODEL, "timeouts": timeouts}
        return OpenAICompatDeployment(OpenAICompatConfig(**{**base, **config}))
    return make


def chat(d):
    return d.request(typed("chat", CHAT))


def stream_chat(d):
    return collect(d, "chat", CHAT)


def test_request_replaces_model_and_returns_the_body(mock):
    body = run(deployment(mock, api_key="sk-test"), chat)
    assert body["object"] == "chat.completion" and body["model"] == UPSTREAM_MODEL
    assert body["choices"][0]["message"]["content"] == REPLY
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    (received,) = mock.requests
    assert received.path == "/v1/chat/completions" and received.body["model"] == UPSTREAM_MODEL
    assert received.body["stream"] is False and "stream_options" not in received.body
    assert received.headers["authorization"] == "Bearer sk-test"


def test_completions_and_embeddings(mock):
    make = deployment(mock, endpoints=frozenset({"completions", "embeddings"}), headers={"x-team": "a"})
    text = run(make, lambda d: d.request(typed("completions", {"model": "m", "prompt": "a b", "max_tokens": 2})))
    assert text["choices"][0]["text"] == "alpha bravo"
    vectors = run(make, lambda d: d.request(typed("embeddings", {"model": "m", "input": ["x", "y z"]})))
    assert len(vectors["data"]) == 2 and vectors["usage"]["prompt_tokens"] == 3
    assert "stream" not in mock.requests[-1].body and mock.requests[-1].headers["x-team"] == "a"
    error, _ = fails(make, chat)
    assert error.kind is ErrorKind.INVALID_REQUEST


def test_stream_yields_content_then_one_usage_chunk(mock):
    chunks = run(deployment(mock), stream_chat)
    *content, usage = chunks
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == REPLY
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert all("usage" not in c for c in content)
    sent = mock.requests[0].body
    assert sent["model"] == UPSTREAM_MODEL and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


def test_stream_from_an_upstream_that_ignores_include_usage_ends_with_null_usage(mock):
    mock.honour_include_usage = False
    *content, last = run(deployment(mock), stream_chat)
    assert last["choices"] == [] and last["usage"] is None and last["model"] == UPSTREAM_MODEL
    assert len(content) == 5


def test_streams_reuse_the_connection(mock):
    async def two_streams(d):
        await collect(d, "chat", CHAT)
        await collect(d, "chat", CHAT)
    run(deployment(mock), two_streams)
    assert mock.connections == 1


@pytest.mark.parametrize("headers, expected", [
    ({"retry_after": 2}, 2.0),
    ({"retry_after_ms": 1500, "retry_after": 2}, 1.5),
    ({}, None),
])
def test_rate_limit_carries_retry_after(mock, headers, expected):
    mock.inject(Fault.error(429, "slow down", **headers))
    error, _ = fails(deployment(mock), chat)
    assert (error.kind, error.status, error.retry_after, error.message) == \
        (ErrorKind.RATE_LIMIT, 429, expected, "slow down")


def test_retry_after_as_an_http_date(mock):
    mock.inject(Fault.error(429, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True)))
    error, _ = fails(deployment(mock), stream_chat)
    assert error.kind is ErrorKind.RATE_LIMIT and 25 <= error.retry_after <= 30


def test_server_error_once_then_success(mock):
    mock.inject(Fault.error(500))
    error, _ = fails(deployment(mock), chat)
    assert (error.kind, error.status) == (ErrorKind.SERVER, 500)
    assert run(deployment(mock), chat)["choices"][0]["message"]["content"] == REPLY


def test_persistent_503_until_it_recovers(mock):
    mock.set_persistent(Fault.error(503, retry_after=1), duration=0.4)
    for _ in range(2):
        error, _ = fails(deployment(mock), stream_chat)
        assert (error.kind, error.status, error.retry_after) == (ErrorKind.OVERLOADED, 503, 1.0)
    time.sleep(0.45)
    assert run(deployment(mock), chat)["model"] == UPSTREAM_MODEL


def test_503_without_retry_hint_is_a_server_error(mock):
    mock.set_persistent(Fault.error(503))
    error, _ = fails(deployment(mock), chat)
    assert error.kind is ErrorKind.SERVER


def test_non_json_error_body(mock):
    mock.inject(Fault.error(502, raw_body="<html>bad gateway</html>"))
    error, _ = fails(deployment(mock), chat)
    assert (error.kind, error.status, error.message) == (ErrorKind.SERVER, 502, "<html>bad gateway</html>")


def test_upstream_auth_failure(mock):
    mock.api_key = "right"
    error, _ = fails(deployment(mock, api_key="wrong"), chat)
    assert (error.kind, error.status) == (ErrorKind.AUTH, 401)


@pytest.mark.parametrize("call", [chat, stream_chat])
def test_reset_before_headers_is_a_connection_error(mock, call):
    mock.inject(Fault.reset())
    error, _ = fails(deployment(mock), call)
    assert (error.kind, error.status) == (ErrorKind.CONNECTION, 502)


def test_refused_connection(mock):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        error, elapsed = fails(deployment(mock, base_url=f"http://127.0.0.1:{port}/v1"), chat)
    assert error.kind is ErrorKind.CONNECTION and elapsed < 1


def test_no_answer_times_out_at_first_token(mock):
    mock.inject(Fault.hang())
    error, elapsed = fails(deployment(mock), stream_chat)
    assert (error.kind, error.status, error.code) == (ErrorKind.TIMEOUT, 504, "first_token_timeout")
    assert 0.25 < elapsed < 1.5


def test_a_non_streamed_answer_is_bounded_by_total_not_first_token(mock):
    # it arrives whole, so first_token would cut every long generation
    mock.inject(Fault.slow_first_token(0.6))
    assert run(deployment(mock), chat)["choices"]
    mock.inject(Fault.hang())
    limits = Timeouts(connect=0.5, first_token=0.1, total=0.5, stream_silence=0.1)
    error, elapsed = fails(deployment(mock, timeouts=limits), chat)
    assert (error.kind, error.status, error.code) == (ErrorKind.TIMEOUT, 504, "total_timeout")
    assert 0.4 < elapsed < 1.5


@pytest.mark.parametrize("before_headers", [True, False])
def test_slow_first_token(mock, before_headers):
    mock.inject(Fault.slow_first_token(0.6, before_headers=before_headers))
    error, elapsed = fails(deployment(mock), stream_chat)
    assert error.code == "first_token_timeout" and elapsed < 1.5
    # slow but within its limit: a wide margin, as a loaded machine can stall the test process itself
    mock.inject(Fault.slow_first_token(0.3, before_headers=before_headers))
    assert len(run(deployment(mock, timeouts=dataclasses.replace(FAST, first_token=1.5)), stream_chat)) == 6


def test_total_timeout(mock):
    mock.inject(Fault.slow_first_token(2))
    limits = Timeouts(connect=0.5, first_token=5, total=0.3, stream_silence=5)
    error, elapsed = fails(deployment(mock, timeouts=limits), chat)
    assert (error.kind, error.code) == (ErrorKind.TIMEOUT, "total_timeout") and elapsed < 1.5


def test_stream_cut_mid_answer(mock):
    mock.inject(Fault.cut(after=2))
    got: list = []
    error, _ = fails(deployment(mock), lambda d: collect(d, "chat", CHAT, got))
    assert (error.kind, error.status) == (ErrorKind.CONNECTION, 502) and len(got) == 2


def test_stream_stall_hits_the_silence_timeout(mock):
    mock.inject(Fault.stall(after=2))
    got: list = []
    error, elapsed = fails(deployment(mock), lambda d: collect(d, "chat", CHAT, got))
    assert (error.kind, error.code) == (ErrorKind.TIMEOUT, "stream_silence_timeout") and len(got) == 2
    assert 0.25 < elapsed < 1.5


def test_non_streamed_body_stall_times_out(mock):
    mock.inject(Fault.stall(after=0))
    limits = Timeouts(connect=0.5, first_token=0.1, total=0.5, stream_silence=0.1)
    error, elapsed = fails(deployment(mock, timeouts=limits), chat)
    assert error.code == "total_timeout" and elapsed < 1.5


def test_malformed_chunk(mock):
    mock.inject(Fault.malformed(after=1))
    error, _ = fails(deployment(mock), stream_chat)
    assert (error.kind, error.code) == (ErrorKind.SERVER, "malformed_chunk")


def test_malformed_body(mock):
    mock.inject(Fault.malformed(after=0))
    error, _ = fails(deployment(mock), chat)
    assert (error.kind, error.code) == (ErrorKind.SERVER, "malformed_response")


def test_error_event_mid_stream(mock):
    mock.inject(Fault.error_event(after=2, status=503, message="engine failed"))
    got: list = []
    error, _ = fails(deployment(mock), lambda d: collect(d, "chat", CHAT, got))
    assert (error.kind, error.status, error.message) == (ErrorKind.SERVER, 503, "engine failed") and len(got) == 2


def test_a_finished_stream_without_done_is_whole(mock):
    mock.inject(Fault.no_done())
    chunks = run(deployment(mock), stream_chat)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == REPLY
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_a_stream_cut_before_its_finish_reason_is_truncated(mock):
    mock.inject(Fault.cut(after=2))
    got: list = []
    error, _ = fails(deployment(mock), lambda d: collect(d, "chat", CHAT, got))
    assert error.kind is ErrorKind.CONNECTION and len(got) == 2


@pytest.mark.parametrize("call", [chat, stream_chat])
def test_context_length_and_content_policy(mock, call):
    mock.inject(Fault.context_length(), Fault.content_policy())
    error, _ = fails(deployment(mock), call)
    assert (error.kind, error.status, error.code) == (ErrorKind.CONTEXT_LENGTH, 400, "context_length_exceeded")
    error, _ = fails(deployment(mock), call)
    assert (error.kind, error.code) == (ErrorKind.CONTENT_POLICY, "content_policy_violation")
    assert not error.kind.retryable


def test_config_is_validated():
    with pytest.raises(ValueError, match="base_url"):
        OpenAICompatConfig(name="x", base_url="localhost:8000", model="m")
    with pytest.raises(ValueError, match="endpoints"):
        OpenAICompatConfig(name="x", base_url="http://h/v1", model="m", endpoints=frozenset({"audio"}))
