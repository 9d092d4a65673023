"""The gateway end to end: a real `inferd serve --config` in front of fault-injecting upstreams.

Three mock providers run in this process (a primary, a backup and a long-context
one, all real HTTP servers on loopback); the server runs them as model groups
with short timeouts, fast retries and a circuit breaker with a one-second
cooldown, next to a local tiny Llama. Each test injects one fault, drives the
server with the official `openai` SDK or httpx, checks what the client got, what
the upstreams received, and that the gateway is healthy afterwards.
"""

from __future__ import annotations

import os
import time

import httpx
import openai
import pytest
import yaml

from tests.api.conftest import ServerProc, wait_for
from tests.gateway.mock_upstream import Fault, MockUpstream

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def upstreams():
    mocks = {name: MockUpstream(model=f"up-{name}").start() for name in ("primary", "backup", "long")}
    yield mocks
    for m in mocks.values():
        m.stop()


@pytest.fixture(scope="module")
def gateway_server(upstreams, tiny_llama, tmp_path_factory):
    fast = {"connect": 1, "first_token": 0.5, "total": 5, "stream_silence": 0.5}
    config = {"models": [
        {"name": "remote", "aliases": ["gpt-test"],
         "deployments": [{"provider": "openai", "name": "primary", "base_url": upstreams["primary"].openai_base_url,
                          "model": "up-primary", "timeouts": fast}],
         "retry": {"max_retries": 1, "base_s": 0.05, "max_s": 0.2, "max_retry_after_s": 2},
         "circuit_breaker": {"failure_threshold": 3, "cooldown_s": 1},
         "fallbacks": {"default": ["backup"], "context_length": ["long"]}},
        {"name": "backup",
         "deployments": [{"provider": "openai", "name": "backup", "base_url": upstreams["backup"].openai_base_url,
                          "model": "up-backup", "timeouts": fast}]},
        {"name": "long",
         "deployments": [{"provider": "openai", "name": "long", "base_url": upstreams["long"].openai_base_url,
                          "model": "up-long", "timeouts": fast}]},
        {"name": "claude",
         "deployments": [{"provider": "anthropic", "name": "claude", "base_url": upstreams["primary"].url,
                          "model": "up-claude", "timeouts": fast, "api_key_env": "INFERD_TEST_ANTHROPIC_KEY"}]},
        {"name": "tiny", "deployments": [{"provider": "local", "model": str(tiny_llama)}]},
    ]}
    path = tmp_path_factory.mktemp("gateway") / "inferd.yaml"
    path.write_text(yaml.safe_dump(config))
    os.environ["INFERD_TEST_ANTHROPIC_KEY"] = "test-anthropic-key"  # read by the server it starts
    srv = ServerProc(tiny_llama, "--config", str(path), api_key=None).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def clean(upstreams, gateway_server):
    for m in upstreams.values():
        m.clear_faults()
    # every test starts with the primary's circuit closed (an earlier test may have opened it)
    wait_for(lambda: chat(gateway_server).headers["x-inferd-deployment"] == "primary", timeout=5)
    for m in upstreams.values():
        m.reset_requests()
    yield
    # whatever happened, the gateway still answers
    assert httpx.get(gateway_server.url + "/health", timeout=5).status_code == 200


def chat(srv, model="remote", **kw) -> httpx.Response:
    body = {"model": model, "messages": CHAT, "max_tokens": 4, **kw}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)


def test_answers_name_the_model_and_deployment_and_overhead(gateway_server, upstreams):
    r = chat(gateway_server, model="gpt-test")
    assert r.status_code == 200 and r.json()["model"] == "up-primary"
    assert r.headers["x-inferd-deployment"] == "primary" and r.headers["x-inferd-attempts"] == "1"
    assert 0 <= float(r.headers["x-inferd-overhead-ms"]) < 1000
    sent = upstreams["primary"].requests[-1]
    assert sent.body["model"] == "up-primary" and sent.body["messages"] == CHAT


@pytest.mark.parametrize("retry_after", ["1", None])
def test_429_is_retried_honouring_retry_after(gateway_server, upstreams, retry_after):
    upstreams["primary"].inject(Fault.error(429, "slow down", retry_after=retry_after))
    t0 = time.monotonic()
    r = chat(gateway_server)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200 and r.headers["x-inferd-attempts"] == "2"
    assert upstreams["primary"].count() == 2 and upstreams["backup"].count() == 0
    if retry_after:
        assert elapsed >= 1.0
    else:
        assert elapsed < 1.0


def test_500_once_is_retried_invisibly(gateway_server, upstreams):
    upstreams["primary"].inject(Fault.error(500))
    r = chat(gateway_server, stream=True, stream_options={"include_usage": True})
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "data: [DONE]" and '"usage"' in events[-2]
    assert r.headers["x-inferd-attempts"] == "2"


@pytest.mark.parametrize("fault", [Fault.reset(), Fault.hang(), Fault.slow_first_token(2.0)],
                         ids=["reset-before-headers", "no-response", "slow-first-token"])
def test_broken_connections_are_retried(gateway_server, upstreams, fault):
    upstreams["primary"].inject(fault)
    client = gateway_server.client(timeout=20)
    stream = client.chat.completions.create(model="remote", messages=CHAT, max_tokens=4, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.split() == ["alpha", "bravo", "charlie", "delta"]
    assert upstreams["primary"].count() == 2


def test_persistent_503_falls_back_to_the_backup(gateway_server, upstreams):
    upstreams["primary"].set_persistent(Fault.error(503, "down"))
    r = chat(gateway_server)
    assert r.status_code == 200 and r.json()["model"] == "up-backup"
    assert r.headers["x-inferd-fallback-from"] == "remote" and r.headers["x-inferd-deployment"] == "backup"
    assert upstreams["primary"].count() == 2  # one attempt and one retry, then the fallback


def test_a_primary_down_for_a_while_is_skipped_then_used_again(gateway_server, upstreams):
    primary = upstreams["primary"]
    primary.set_persistent(Fault.error(503, "down"), duration=1.5)
    served = [chat(gateway_server).headers["x-inferd-deployment"] for _ in range(4)]
    assert served == ["backup"] * 4
    assert primary.count() == 3  # the circuit opened after three failures: later requests skip it
    metrics = httpx.get(gateway_server.url + "/metrics").text
    assert 'inferd:gateway_circuit_state{deployment="primary"} 1.0' in metrics
    time.sleep(1.6)  # the outage is over and the cooldown has passed: one probe, it succeeds
    assert chat(gateway_server).headers["x-inferd-deployment"] == "primary"
    assert chat(gateway_server).headers["x-inferd-deployment"] == "primary"


@pytest.mark.parametrize("fault", [Fault.cut(after=2), Fault.stall(after=2), Fault.malformed(after=2),
                                   Fault.no_done()], ids=["cut", "stall", "malformed", "no-done"])
def test_a_stream_broken_after_tokens_ends_with_an_error_the_sdk_raises(gateway_server, upstreams, fault):
    upstreams["primary"].inject(fault)
    client = gateway_server.client(timeout=20)
    stream = client.chat.completions.create(model="remote", messages=CHAT, max_tokens=6, stream=True)
    got = []
    t0 = time.monotonic()
    with pytest.raises(openai.APIError):
        for chunk in stream:
            got.extend(c.delta.content or "" for c in chunk.choices)
    assert time.monotonic() - t0 < 5
    assert "".join(got).split()[:1] == ["alpha"]  # tokens arrived before the failure
    assert upstreams["primary"].count() == 1 and upstreams["backup"].count() == 0  # never replayed


def test_context_length_goes_to_the_long_model_without_retry(gateway_server, upstreams):
    upstreams["primary"].inject(Fault.context_length())
    r = chat(gateway_server)
    assert r.status_code == 200 and r.json()["model"] == "up-long"
    assert r.headers["x-inferd-fallback-from"] == "remote"
    assert upstreams["primary"].count() == 1 and upstreams["backup"].count() == 0


def test_content_policy_is_propagated_not_retried(gateway_server, upstreams):
    upstreams["primary"].inject(Fault.content_policy())
    with pytest.raises(openai.BadRequestError) as e:
        gateway_server.client().chat.completions.create(model="remote", messages=CHAT, max_tokens=4)
    assert e.value.body["code"] == "content_policy_violation"
    assert upstreams["primary"].count() == 1 and upstreams["backup"].count() == 0


def test_anthropic_deployment_through_the_openai_api(gateway_server, upstreams):
    client = gateway_server.client()
    out = client.chat.completions.create(model="claude", messages=CHAT, max_tokens=3)
    assert out.choices[0].message.content.split() == ["alpha", "bravo", "charlie"]
    assert out.usage.completion_tokens == 3
    sent = upstreams["primary"].requests[-1]
    assert sent.path == "/v1/messages" and sent.body["model"] == "up-claude" and sent.body["max_tokens"] == 3


def test_local_and_remote_models_side_by_side(gateway_server):
    client = gateway_server.client()
    assert {m.id for m in client.models.list().data} == {"remote", "backup", "long", "claude", "tiny"}
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0)
    assert out.model == "tiny" and out.usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=3)


def test_gateway_metrics_count_attempts_by_status(gateway_server, upstreams):
    upstreams["primary"].inject(Fault.error(500))
    assert chat(gateway_server).status_code == 200
    metrics = httpx.get(gateway_server.url + "/metrics").text
    assert 'inferd:gateway_attempts_total{deployment="primary",status="500"}' in metrics
    assert 'inferd:gateway_attempts_total{deployment="primary",status="200"}' in metrics
    wait_for(lambda: 'inferd:gateway_in_flight{deployment="primary"} 0.0' in httpx.get(
        gateway_server.url + "/metrics").text)
