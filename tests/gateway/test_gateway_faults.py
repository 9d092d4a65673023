"""The gateway end to end: a real `inferd serve --config` in front of fault-injecting upstreams.

Four mock providers run in this process (a primary, a backup, a long-context one
and a strict one that refuses assistant prefill, all real HTTP servers on
loopback); the server runs them as model groups
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

from inferd.store import open_store
from inferd.tenancy import ledger
from tests.api.conftest import ServerProc, wait_for
from tests.gateway.mock_upstream import Fault, MockUpstream

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def upstreams():
    mocks = {name: MockUpstream(model=f"up-{name}").start() for name in ("primary", "backup", "long")}
    mocks["strict"] = MockUpstream(model="up-strict", prefill=False).start()
    yield mocks
    for m in mocks.values():
        m.stop()


@pytest.fixture(scope="module")
def gateway_server(upstreams, tiny_llama, tmp_path_factory):
    fast = {"connect": 1, "first_token": 0.5, "total": 5, "stream_silence": 0.5}
    # the primaries of the failover groups: a slow first token there would fall back before the stream
    # starts, and those tests are about what happens after it
    patient = {**fast, "first_token": 5}
    config = {"models": [
        {"name": "remote", "aliases": ["gpt-test"],
         "deployments": [{"provider": "openai", "name": "primary", "base_url": upstreams["primary"].openai_base_url,
                          "model": "up-primary", "timeouts": fast}],
         "retry": {"max_retries": 1, "base_s": 0.05, "max_s": 0.2, "max_retry_after_s": 2},
         "circuit_breaker": {"failure_threshold": 3, "cooldown_s": 1},
         "fallbacks": {"default": ["backup"], "context_length": ["long"]}},
        {"name": "backup",
         "deployments": [{"provider": "openai", "name": "backup", "base_url": upstreams["backup"].openai_base_url,
                          "model": "up-backup", "timeouts": fast, "prefill": True}]},
        # the same primary, falling back to a server without prefill (it regenerates) ...
        {"name": "remote-regen", "fallbacks": {"default": ["regen"]},
         "deployments": [{"provider": "openai", "name": "primary-2", "base_url": upstreams["primary"].openai_base_url,
                          "model": "up-primary", "timeouts": patient}]},
        {"name": "regen",
         "deployments": [{"provider": "openai", "name": "regen", "base_url": upstreams["strict"].openai_base_url,
                          "model": "up-strict", "timeouts": fast}]},
        # ... and to one configured for prefill that refuses it
        {"name": "remote-refused", "fallbacks": {"default": ["refuser"]},
         "deployments": [{"provider": "openai", "name": "primary-3", "base_url": upstreams["primary"].openai_base_url,
                          "model": "up-primary", "timeouts": patient}]},
        # ... and to inferd's own engine, which continues the answer (continue_final_message)
        {"name": "remote-local", "fallbacks": {"default": ["tiny"]},
         "deployments": [{"provider": "openai", "name": "primary-4", "base_url": upstreams["primary"].openai_base_url,
                          "model": "up-primary", "timeouts": patient}]},
        {"name": "refuser",
         "deployments": [{"provider": "openai", "name": "refuser", "base_url": upstreams["strict"].openai_base_url,
                          "model": "up-strict", "timeouts": fast, "prefill": True}]},
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


def test_a_reset_before_headers_is_retried_on_the_same_deployment(gateway_server, upstreams):
    upstreams["primary"].inject(Fault.reset())
    client = gateway_server.client(timeout=20)
    stream = client.chat.completions.create(model="remote", messages=CHAT, max_tokens=4, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.split() == ["alpha", "bravo", "charlie", "delta"]
    assert upstreams["primary"].count() == 2 and upstreams["backup"].count() == 0


@pytest.mark.parametrize("fault", [Fault.hang(), Fault.slow_first_token(2.0)], ids=["no-response", "slow-first-token"])
def test_a_timeout_before_the_first_token_moves_on_at_once(gateway_server, upstreams, fault):
    """A deployment that let its first-token timeout run out is not asked again: the fallback answers."""
    upstreams["primary"].inject(fault)
    client = gateway_server.client(timeout=20)
    t0 = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model="remote", messages=CHAT, max_tokens=4, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text.split() == ["alpha", "bravo", "charlie", "delta"]
    assert raw.headers["x-inferd-deployment"] == "backup" and raw.headers["x-inferd-fallback-from"] == "remote"
    assert upstreams["primary"].count() == 1 and upstreams["backup"].count() == 1
    assert time.monotonic() - t0 < 2.0  # one first-token timeout (0.5 s), not one per retry


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


def stream_chat(srv, model: str, max_tokens: int = 6) -> tuple[str, list]:
    client = srv.client(timeout=20)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True}))
    return "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices), chunks


ANSWER6 = "alpha bravo charlie delta echo foxtrot"


@pytest.mark.parametrize("fault", [Fault.cut(after=2), Fault.stall(after=2), Fault.malformed(after=2),
                                   Fault.error_event(after=2)], ids=["cut", "stall", "malformed", "error-event"])
def test_a_stream_broken_after_tokens_is_finished_by_the_fallback(gateway_server, upstreams, fault):
    """The backup continues the partial answer (an assistant prefill): the client sees one whole answer."""
    upstreams["primary"].inject(fault)
    t0 = time.monotonic()
    text, chunks = stream_chat(gateway_server, "remote")
    assert text == ANSWER6 and time.monotonic() - t0 < 5
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-2].model_extra["inferd_deployments"] == ["primary", "backup"]
    sent = upstreams["backup"].requests[-1].body
    assert sent["messages"] == [*CHAT, {"role": "assistant", "content": "alpha bravo"}]
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["max_tokens"] == 4  # the rest of the client's budget
    # both parts are counted: the backup's usage (prompt 4 words with the prefill, 4 words out) plus the
    # primary's 2 tokens out and its prompt (estimated: the backup's without the prefill)
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2 + 4, 2 + 4, 12)
    assert upstreams["primary"].count() == 1  # never replayed where it broke


def test_the_ledger_counts_both_parts_of_a_finished_stream(gateway_server, upstreams):
    upstreams["primary"].inject(Fault.cut(after=2))
    body = {"model": "remote", "messages": CHAT, "max_tokens": 6, "stream": True}
    with httpx.stream("POST", gateway_server.url + "/v1/chat/completions", json=body, timeout=20) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
        request_id = r.headers["x-request-id"]
    assert events[-1] == "data: [DONE]"
    store = open_store(f"sqlite:///{gateway_server.store_path}")
    try:
        rows = wait_for(lambda: store.run_sync(lambda tx: ledger.select(tx, "request_id = ?", (request_id,))))
    finally:
        store.close()
    [row] = rows
    assert (row.status, row.deployment, row.prompt_tokens, row.completion_tokens) == (200, "backup", 6, 6)


def test_a_fallback_without_prefill_regenerates_and_sends_only_what_is_new(gateway_server, upstreams):
    upstreams["primary"].inject(Fault.cut(after=3))
    text, chunks = stream_chat(gateway_server, "remote-regen")
    assert text == ANSWER6
    assert chunks[-2].model_extra["inferd_deployments"] == ["primary-2", "regen"]
    sent = upstreams["strict"].requests[-1].body
    assert sent["messages"] == CHAT and "continue_final_message" not in sent and sent["max_tokens"] == 6


def test_a_local_engine_continues_a_broken_remote_stream(gateway_server, upstreams):
    upstreams["primary"].inject(Fault.cut(after=2))
    text, chunks = stream_chat(gateway_server, "remote-local")
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.startswith("alpha bravo") and len(text) > len("alpha bravo")
    assert finish[-1].choices[0].finish_reason == "length" and len(finish[-1].model_extra["inferd_deployments"]) == 2
    assert chunks[-1].usage.completion_tokens == 6  # 2 from the primary, the 4 left from the engine


def test_a_fallback_that_refuses_prefill_ends_the_stream_with_the_error(gateway_server, upstreams):
    upstreams["primary"].inject(Fault.cut(after=2))
    client = gateway_server.client(timeout=20)
    got = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(model="remote-refused", messages=CHAT, max_tokens=6,
                                                    stream=True):
            got.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(got) == "alpha bravo"  # what arrived before the break, nothing repeated
    assert upstreams["strict"].count() == 1


def test_a_stream_without_done_but_finished_is_a_success(gateway_server, upstreams):
    upstreams["primary"].inject(Fault.no_done())
    text, chunks = stream_chat(gateway_server, "remote")
    assert text == ANSWER6 and chunks[-1].usage.completion_tokens == 6
    assert upstreams["backup"].count() == 0


def test_default_fallback_covers_context_length_without_its_own_chain(gateway_server, upstreams):
    upstreams["primary"].inject(Fault.context_length())
    r = chat(gateway_server, model="remote-regen")
    assert r.status_code == 200 and r.json()["model"] == "up-strict"
    assert r.headers["x-inferd-fallback-from"] == "remote-regen" and upstreams["primary"].count() == 1


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
    assert {m.id for m in client.models.list().data} == {"remote", "backup", "long", "claude", "tiny", "remote-regen",
                                                          "regen", "remote-refused", "refuser", "remote-local"}
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
