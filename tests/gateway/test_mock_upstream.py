"""Sanity checks of the mock upstream itself: answers, fault queue, persistent faults, control endpoint."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.gateway.mock_upstream import WORDS, Fault, MockUpstream

ANTHROPIC_HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def server():
    with MockUpstream(model="mock-7b") as mock:
        yield mock


@pytest.fixture
def mock(server):
    server.clear_faults()
    server.reset_requests()
    yield server
    server.clear_faults()


@pytest.fixture
def client(mock):
    with httpx.Client(base_url=mock.url, timeout=5) as client:
        yield client


def chat(client: httpx.Client, **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": "one two three"}], **extra})


def test_models_and_deterministic_answers(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "mock-7b"
    body = chat(client).json()
    assert body["model"] == "mock-7b" and body["choices"][0]["message"]["content"] == " ".join(WORDS[:8])
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    assert chat(client).json()["choices"] == body["choices"]


def test_stream_honours_include_usage(client):
    plain = chat(client, stream=True, max_tokens=2).text.split("\n\n")
    assert plain[-2:] == ["data: [DONE]", ""] and len(plain) == 2 + 1 + 2 and "usage" not in plain[-3]
    usage = chat(client, stream=True, max_tokens=2, stream_options={"include_usage": True}).text
    assert '"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}' in usage


def test_embeddings_are_deterministic_unit_vectors(client):
    first = client.post("/v1/embeddings", json={"input": ["a", "b"], "dimensions": 16}).json()["data"]
    again = client.post("/v1/embeddings", json={"input": "a", "dimensions": 16}).json()["data"]
    assert first[0]["embedding"] == again[0]["embedding"] != first[1]["embedding"]
    assert abs(sum(x * x for x in first[0]["embedding"]) - 1) < 1e-9 and len(first[0]["embedding"]) == 16


def test_anthropic_needs_its_headers(client):
    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/messages", json=body).status_code == 400
    assert client.post("/v1/messages", json=body, headers={"anthropic-version": "x"}).json()["error"]["type"] == \
        "authentication_error"
    answer = client.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS).json()
    assert answer["content"][0]["text"] == "alpha bravo" and answer["stop_reason"] == "max_tokens"


def test_faults_are_consumed_in_order_and_requests_recorded(mock, client):
    mock.inject(Fault.error(429, retry_after=1), Fault.error(500))
    responses = [chat(client) for _ in range(3)]
    assert [r.status_code for r in responses] == [429, 500, 200]
    assert responses[0].headers["retry-after"] == "1"
    assert mock.count() == 3 and mock.count("/v1/chat/completions") == 3
    assert mock.requests[0].body["messages"][0]["content"] == "one two three"


def test_persistent_fault_for_a_while(mock, client):
    mock.set_persistent(Fault.error(503), duration=0.3)
    assert [chat(client).status_code for _ in range(2)] == [503, 503]
    time.sleep(0.35)
    assert chat(client).status_code == 200


def test_control_endpoint(mock, client):
    client.post("/_control", json={"inject": [{"kind": "error", "status": 418}]})
    assert chat(client).status_code == 418
    client.post("/_control", json={"persistent": {"kind": "error", "status": 500}})
    assert chat(client).status_code == 500
    assert client.post("/_control", json={"clear": True}).json() == {"requests": 2, "queued": 0}
    assert chat(client).status_code == 200 and mock.count() == 3


def test_stream_faults_on_the_wire(mock, client):
    mock.inject(Fault.no_done(), Fault.malformed(after=0))
    assert "[DONE]" not in chat(client, stream=True).text
    assert chat(client, stream=True).text.startswith('data: {"choices": [{"delta": \n\n')
    mock.inject(Fault.cut(after=1))
    with pytest.raises(httpx.RemoteProtocolError):
        chat(client, stream=True)


def test_latency_knob_and_no_recording():
    with MockUpstream(latency=0.1, record=False) as mock, httpx.Client(base_url=mock.url) as client:
        start = time.monotonic()
        assert chat(client).status_code == 200 and time.monotonic() - start >= 0.1
        assert mock.count() == 1 and mock.requests == []
