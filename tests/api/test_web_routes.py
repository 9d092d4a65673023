"""The routes the web app reads: its static files at / (public), /v1/deployments, and /v1/usage's `tz`.

The server serves only remote groups (the mock provider), so it starts in a
second: no engine core to load. It has an admin key, so every API route needs one
and the static files are the only pages a browser may fetch without.
"""

from __future__ import annotations

import httpx
import pytest
import yaml

from inferd.api.routes_web import WEB_ROOT
from tests.api.conftest import ServerProc
from tests.gateway.mock_upstream import MockUpstream

ADMIN = "web-routes-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama):
    mock = MockUpstream(model="mock-remote").start()
    config = {"models": [
        {"name": "remote", "price": {"input": 2.0, "cached_input": 1.0, "output": 8.0},
         "deployments": [{"provider": "openai", "name": "remote-a", "model": "m", "base_url": mock.openai_base_url},
                         {"provider": "openai", "name": "remote-b", "model": "m", "base_url": mock.openai_base_url,
                          "price": {"input": 4.0, "output": 16.0}}]}]}
    path = tmp_path_factory.mktemp("web-routes") / "inferd.yaml"
    path.write_text(yaml.safe_dump(config))
    server = ServerProc(tiny_llama, "--config", str(path), api_key=ADMIN).wait_ready()
    yield server
    server.stop()
    mock.stop()


def test_the_app_is_served_without_a_key_and_nothing_else_is(srv):
    r = httpx.get(srv.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text == (WEB_ROOT / "index.html").read_text()
    for path, kind in [("/ui/app.js", "javascript"), ("/ui/app.css", "text/css"),
                       ("/ui/vendor/chartjs/chart.umd.min.js", "javascript")]:
        r = httpx.get(srv.url + path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
    assert "MIT" in httpx.get(srv.url + "/ui/vendor/chartjs/LICENSE.md").text
    assert httpx.get(srv.url + "/ui/nope.js").status_code == 404
    # the public prefix is the files' folder only: a path out of it serves nothing, and the API still needs a key
    assert httpx.get(srv.url + "/ui/../v1/usage").status_code in (401, 404)
    assert httpx.get(srv.url + "/ui/%2e%2e/pyproject.toml").status_code == 404
    assert httpx.get(srv.url + "/v1/deployments").status_code == 401
    assert httpx.get(srv.url + "/v1/usage").status_code == 401


def test_deployments_list_prices_and_load(srv):
    body = httpx.get(srv.url + "/v1/deployments", headers=AUTH).json()
    assert body["object"] == "list" and body["time"] > 1.7e9
    by_id = {d["id"]: d for d in body["data"]}
    assert set(by_id) == {"remote-a", "remote-b"}
    a, b = by_id["remote-a"], by_id["remote-b"]
    assert a["model"] == b["model"] == "remote" and a["kind"] == "remote" and a["engine"] is None
    assert a["endpoints"] == ["chat", "completions"] and a["healthy"] is True and a["in_flight"] == 0
    # a deployment's own price wins over its group's
    assert (a["price"]["input"], a["price"]["cached_input"], a["price"]["output"]) == (2.0, 1.0, 8.0)
    assert (b["price"]["input"], b["price"]["output"]) == (4.0, 16.0)


def test_usage_days_follow_the_time_zone_asked_for(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", headers=AUTH,
                   json={"model": "remote", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    for tz in ("UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago"):  # UTC+14 and UTC-11: never the same date
        body = httpx.get(srv.url + "/v1/usage", params={"group_by": "day", "tz": tz}, headers=AUTH).json()
        assert body["tz"] == tz and len(body["data"]) == 1
        days = body["data"][0]["day"]
        if tz == "Pacific/Kiritimati":
            kiritimati = days
        if tz == "Pacific/Pago_Pago":
            assert days != kiritimati
    r = httpx.get(srv.url + "/v1/usage", params={"tz": "Mars/Olympus"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tz" and "IANA" in r.json()["error"]["message"]
    g = httpx.get(srv.url + "/v1/usage", headers=AUTH).json()["data"][0]
    assert {"ttft_p50_s", "ttft_p95_s", "ttft_p99_s"} <= set(g)
