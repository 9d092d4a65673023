"""Model versions of a group served by Ray replicas: the version answers, a new one loads beside it.

One local Ray cluster (tests/ray_fixtures.py, two CPUs) and one `inferd serve`
whose group `tiny` is a `provider: ray` deployment of one replica (one CPU) of
the tiny Llama. The tests check, through the HTTP API:
- a request names the version that answered (`x-inferd-model-version`) and the
  replica (`x-inferd-deployment`); `/admin/models/tiny` lists v1 with its replica;
- deploying a changed spec as a canary loads it as a replica pool of its own,
  named per version (`tiny-ray@v2`, replica `tiny-ray@v2#0`) on the second CPU,
  beside v1's; promoting it moves traffic to it, and v1's pool drains and is
  released (its replica leaves `/admin/replicas`).
"""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import wait_for
from tests.ray_fixtures import ray_cluster, ray_deployment, serve_on_ray  # noqa: F401 - the fixture


@pytest.fixture(scope="module")
def ray_server(ray_cluster, tiny_llama, tmp_path_factory):  # noqa: F811 - the fixture
    srv = serve_on_ray(ray_cluster, tiny_llama, tmp_path_factory.mktemp("ray-versions"), replicas=1)
    srv.cluster = ray_cluster
    yield srv
    srv.stop()


def complete(srv) -> httpx.Response:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    return httpx.post(srv.url + "/v1/completions", json=body, headers=srv.headers, timeout=60)


def card(srv) -> dict:
    r = httpx.get(srv.url + "/admin/models/tiny", headers=srv.headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def pools(srv) -> dict[str, dict]:
    r = httpx.get(srv.url + "/admin/replicas", headers=srv.headers, timeout=10)
    assert r.status_code == 200, r.text
    return {p["id"]: p for p in r.json()["data"]}


def test_a_ray_group_reports_the_version_that_answered(ray_server):
    r = complete(ray_server)
    assert r.status_code == 200, r.text
    assert r.headers["x-inferd-model-version"] == "v1"
    assert r.headers["x-inferd-deployment"] == "tiny-ray#0"
    c = card(ray_server)
    assert (c["stable"], c["canary"]) == ("v1", None)
    assert [(v["label"], v["deployments"]) for v in c["loaded"]] == [("v1", ["tiny-ray#0"])]
    assert list(pools(ray_server)) == ["tiny-ray"]


def test_a_new_version_of_a_ray_group_loads_as_a_canary_of_its_own_replicas(ray_server):
    engine = {"dtype": "float32", "kv_cache_bytes": "16MiB", "max_num_seqs": 4}  # a changed spec: a new version
    spec = ray_deployment(ray_server.cluster, ray_server.model, replicas=1, engine=engine)
    r = httpx.post(ray_server.url + "/admin/models/tiny/deploy", json={"spec": spec, "canary": 50},
                   headers=ray_server.headers, timeout=180)
    assert r.status_code == 200, r.text
    assert (r.json()["stable"], r.json()["canary"]) == ("v1", "v2")
    loaded = {v["label"]: v for v in card(ray_server)["loaded"]}
    assert loaded["v1"]["deployments"] == ["tiny-ray#0"] and loaded["v2"]["deployments"] == ["tiny-ray@v2#0"]
    assert not loaded["v2"]["draining"]
    found = pools(ray_server)
    assert set(found) == {"tiny-ray", "tiny-ray@v2"} and found["tiny-ray@v2"]["ready"] == 1

    r = httpx.post(ray_server.url + "/admin/models/tiny/promote", headers=ray_server.headers, timeout=60)
    assert r.status_code == 200, r.text
    answer = complete(ray_server)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-inferd-model-version"] == "v2"
    assert answer.headers["x-inferd-deployment"] == "tiny-ray@v2#0"
    # v1 takes no new request; with nothing in flight its pool is closed and leaves the registry
    wait_for(lambda: list(pools(ray_server)) == ["tiny-ray@v2"], timeout=60)
    assert [v["label"] for v in card(ray_server)["loaded"]] == ["v2"]
    assert httpx.get(ray_server.url + "/admin/replicas/tiny-ray", headers=ray_server.headers,
                     timeout=10).status_code == 404
