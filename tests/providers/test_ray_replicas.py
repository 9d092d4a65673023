"""Engine replicas on a real Ray cluster: routing over them, a replica killed mid-run, replica counts.

One cluster on loopback (tests/ray_fixtures.py, two CPUs) and one `inferd serve`
whose group `tiny` is a `provider: ray` deployment of two replicas of the slower
tiny Llama (a step costs milliseconds, so a long answer outlives the kill by
seconds even when the server lags behind its engines), one CPU each, routed by
prefix affinity. The tests check, through the
HTTP API as clients see it:
- requests spread over both replicas, and a prompt prefix keeps to its replica;
- killing one replica's actor process (SIGKILL) while streams run loses no
  request: those that had not started are answered by the other replica, the
  started streams are finished there (or end with an error event; never a
  truncated success), and the dead replica is back on a new actor;
- the replica count changes at run time through the admin API, and with load
  when the autoscaler's bounds allow it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from tests.api.conftest import wait_for
from tests.ray_fixtures import ray_cluster, serve_on_ray  # noqa: F401 - the fixture

AUTOSCALE = {"target_queue": 0, "upscale_delay_s": 0, "downscale_delay_s": 2, "interval_s": 0.2}


ENGINE = {"dtype": "float32", "kv_cache_bytes": "64MiB", "max_num_seqs": 8}


@pytest.fixture(scope="module")
def ray_server(ray_cluster, tiny_llama_slow, tmp_path_factory):  # noqa: F811 - the fixture
    srv = serve_on_ray(ray_cluster, tiny_llama_slow, tmp_path_factory.mktemp("ray-serve"), routing="prefix_affinity",
                       max_replicas=2, autoscale=AUTOSCALE, engine=ENGINE)
    yield srv
    srv.stop()


def replicas(srv) -> dict:
    return httpx.get(srv.url + "/admin/replicas/tiny-ray", headers=srv.headers, timeout=10).json()


def set_replicas(srv, **body) -> httpx.Response:
    return httpx.put(srv.url + "/admin/replicas/tiny-ray", json=body, headers=srv.headers, timeout=10)


def ready_with(srv, n: int, timeout: float = 90.0) -> dict:
    """The pool once exactly `n` replicas are up and healthy and none is starting or retiring."""
    def settled():
        p = replicas(srv)
        ok = (p["ready"] == n and not p["starting"] and not p["retiring"]
              and all(r["healthy"] for r in p["data"]))
        return p if ok else None
    return wait_for(settled, timeout=timeout)


async def stream(client: httpx.AsyncClient, srv, prompt: str, max_tokens: int,
                 on_text: Callable[[dict], None] | None = None) -> dict:
    """One streamed completion, read as SSE: the deployment header, the text, how it ended; `on_text(so far)`
    is called as text arrives."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    out = {"text": "", "finish_reason": None, "error": None, "usage": None, "deployments": None, "done": False}
    async with client.stream("POST", srv.url + "/v1/completions", json=body, headers=srv.headers) as r:
        out["status"], out["deployment"] = r.status_code, r.headers.get("x-inferd-deployment")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out["error"] = event["error"]
                continue
            if event.get("usage"):
                out["usage"] = event["usage"]
            for choice in event.get("choices", []):
                out["text"] += choice.get("text") or ""
                out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
            out["deployments"] = event.get("inferd_deployments", out["deployments"])
            if on_text is not None and out["text"]:
                on_text(out)
    return out


async def complete(client: httpx.AsyncClient, srv, prompt: str, max_tokens: int) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    return await client.post(srv.url + "/v1/completions", json=body, headers=srv.headers)


def test_requests_spread_over_both_replicas_and_a_prefix_keeps_to_one(ray_server):
    pool = ready_with(ray_server, 2)
    pids = {r["placement"]["pid"] for r in pool["data"]}
    assert len(pids) == 2 and all(r["placement"]["backend"] == "ray" for r in pool["data"])

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            distinct = await asyncio.gather(*(complete(c, ray_server, f"topic {i}: tell me more", 4)
                                              for i in range(16)))
            same = [await complete(c, ray_server, "one shared system prompt, then a question", 4) for _ in range(6)]
            streamed = await stream(c, ray_server, "stream this", 8)
        return distinct, same, streamed

    distinct, same, streamed = asyncio.run(run())
    assert all(r.status_code == 200 for r in distinct + same)
    spread = Counter(r.headers["x-inferd-deployment"] for r in distinct)
    assert set(spread) == {"tiny-ray#0", "tiny-ray#1"}, spread
    assert len({r.headers["x-inferd-deployment"] for r in same}) == 1  # prefix affinity: its cache is there
    assert streamed["finish_reason"] == "length" and streamed["done"] and streamed["usage"]["completion_tokens"] == 8
    assert streamed["deployment"] in ("tiny-ray#0", "tiny-ray#1")


def test_a_killed_replica_loses_no_request_and_truncates_no_stream(ray_server):
    pool = ready_with(ray_server, 2)
    victim = pool["data"][0]
    restarts_before = victim["placement"]["restarts"]
    n_streams, n_plain, tokens = 10, 10, 600  # long enough that the kill lands mid-answer

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            started = asyncio.Event()  # a stream on the victim is well short of its end

            def on_text(so_far: dict) -> None:
                if so_far["deployment"] == victim["id"] and len(so_far["text"]) < 100:
                    started.set()
            streams = [asyncio.create_task(stream(c, ray_server, f"story {i} begins", tokens, on_text))
                       for i in range(n_streams)]
            plain = [asyncio.create_task(complete(c, ray_server, f"question {i}", 100)) for i in range(n_plain)]
            await asyncio.wait_for(started.wait(), 60)
            # the actor's process, as a node loss would: frozen at once, so that the streams it runs cannot
            # finish before Ray has seen it die
            os.kill(victim["placement"]["pid"], signal.SIGSTOP)
            os.kill(victim["placement"]["pid"], signal.SIGKILL)
            return await asyncio.gather(*streams), await asyncio.gather(*plain)

    streams, plain = asyncio.run(run())
    # nothing that had not started is lost: every non-streamed request was answered whole
    assert [r.status_code for r in plain] == [200] * n_plain
    assert all(r.json()["usage"]["completion_tokens"] == 100 for r in plain)
    # every stream either is a whole answer or says it is not; none passes a cut for a success
    for s in streams:
        assert s["status"] == 200
        if s["error"] is None:
            assert s["finish_reason"] == "length" and s["done"], s
            assert s["usage"]["completion_tokens"] == tokens, s
        else:
            assert s["finish_reason"] is None, s
    continued = [s for s in streams if s["deployments"] and len(s["deployments"]) > 1]
    assert continued, ("no stream was running on the killed replica; kill it earlier",
                       [(s["deployment"], len(s["text"])) for s in streams])
    assert all(s["deployments"][0] == victim["id"] and s["error"] is None for s in continued)
    # the dead replica is back, on a new actor, and serves again
    back = wait_for(lambda: next((r for r in replicas(ray_server)["data"] if r["id"] == victim["id"]
                                  and r["healthy"] and r["placement"]["restarts"] > restarts_before), None),
                    timeout=90)
    assert back["placement"]["pid"] != victim["placement"]["pid"]
    assert "actor died" in back["placement"]["last_death"]
    assert httpx.get(ray_server.url + "/health", timeout=5).status_code == 200


def test_replica_count_changes_at_run_time_and_with_load(ray_server):
    ready_with(ray_server, 2)
    bad = set_replicas(ray_server, replicas=3)  # above max_replicas
    assert bad.status_code == 400 and "max_replicas" in bad.json()["error"]["message"]
    assert set_replicas(ray_server, replicas=5, max_replicas=80).status_code == 400  # past the limit
    assert replicas(ray_server)["replicas"] == 2  # a refused change changes nothing

    # down to one at run time: the retired replica leaves the group, every request goes to the other
    r = set_replicas(ray_server, replicas=1, min_replicas=1)
    assert r.status_code == 202 and r.json()["autoscaling"]  # min 1 < max 2: load decides from now on
    pool = ready_with(ray_server, 1)
    assert [x["id"] for x in pool["data"]] == ["tiny-ray#0"]

    async def flood():
        async with httpx.AsyncClient(timeout=120) as c:
            load = asyncio.gather(*(complete(c, ray_server, f"load {i}", 100) for i in range(40)))
            most = 0
            while not load.done():  # how many replicas there were while the load lasted
                pool = (await c.get(ray_server.url + "/admin/replicas/tiny-ray", headers=ray_server.headers)).json()
                most = max(most, pool["ready"] + pool["starting"])
                await asyncio.sleep(0.1)
            return await load, most

    answers, most = asyncio.run(flood())  # 40 in flight > one replica's 8 slots: the autoscaler adds the second
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers if a.status_code != 200]
    assert most == 2
    # idle again: back down to the minimum once the downscale delay has passed
    pool = ready_with(ray_server, 1, timeout=60)
    assert pool["last_decision"]["desired"] == 1

    # pinned back to two: both up, requests spread again
    assert set_replicas(ray_server, replicas=2, min_replicas=2).status_code == 202
    pool = ready_with(ray_server, 2)
    assert not pool["autoscaling"]
