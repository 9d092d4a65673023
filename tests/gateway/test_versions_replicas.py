"""Two `inferd serve` replicas on one PostgreSQL store agree on the versions they serve.

A version deployed through one replica is loaded and served by the other within
its poll interval; a rollback made through the second is followed by the first.
"""

from __future__ import annotations

import httpx
import pytest
import yaml

from tests.api.conftest import ServerProc, wait_for
from tests.gateway.mock_upstream import MockUpstream
from tests.gateway.test_versions import admin, chat, describe, group, remote


@pytest.fixture(scope="module")
def mocks():
    made = {name: MockUpstream(model=f"up-{name}").start() for name in ("one", "two")}
    yield made
    for m in made.values():
        m.stop()


@pytest.fixture(scope="module")
def replicas(mocks, tiny_llama, postgres_server, tmp_path_factory):
    url = postgres_server.new_database()
    path = tmp_path_factory.mktemp("replicas") / "inferd.yaml"
    path.write_text(yaml.safe_dump({"models": [group("chat", remote(mocks["one"], "chat-one"))]}))
    servers = [ServerProc(tiny_llama, "--config", str(path), "--store", url, "--versions-poll-s", "0.2")
               for _ in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


def serving(srv) -> tuple[str, str | None]:
    card = describe(srv, "chat")
    return card["stable"], card["canary"]


def test_replicas_agree_on_the_active_version(replicas, mocks):
    a, b = replicas
    assert serving(a) == serving(b) == ("v1", None)  # the second start found the first's v1, made no other
    r = admin(a, "POST", "/admin/models/chat/deploy", json={"spec": remote(mocks["two"], "chat-two"), "canary": 100})
    assert r.status_code == 200 and r.json()["stable"] == "v2", r.text
    wait_for(lambda: serving(b) == ("v2", None), timeout=30)
    answer = chat(b, "chat")
    assert answer.headers["x-inferd-model-version"] == "v2" and answer.json()["model"] == "up-two"

    assert admin(b, "POST", "/admin/models/chat/rollback").json()["stable"] == "v1"
    wait_for(lambda: serving(a) == ("v1", None), timeout=30)
    assert chat(a, "chat").headers["x-inferd-model-version"] == "v1"
    assert [e["action"] for e in admin(a, "GET", "/admin/models/chat/history").json()["data"]][:3] == [
        "rollback", "deploy", "config"]
    for s in replicas:
        assert httpx.get(s.url + "/health", timeout=5).status_code == 200
