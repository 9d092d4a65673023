"""Keys, teams, limits, budgets and the ledger through a real `inferd serve` with an admin key.

One server (a tiny local Llama, priced in its config so every token costs
something) serves every test here; each test works in its own team, so their
budgets and usage never mix. The proofs of the metering issue are here: 200
parallel requests against a budget that admits about 50 never overspend by more
than one request's worst case, and the ledger's totals equal, to the token, the
usage clients were given for a mix of streamed, whole and cancelled requests.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest
import yaml

from inferd.tenancy.estimate import prompt_bound
from tests.api.conftest import ROOT, ServerProc, wait_for
from tests.typed import typed

ADMIN = "admin-secret-key"
PRICE = {"input": 100.0, "output": 1000.0}  # USD per million tokens: a request costs around a cent


@pytest.fixture(scope="module")
def srv(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenancy")
    config = {"models": [{"name": "tiny", "price": PRICE,
                          "deployments": [{"provider": "local", "model": str(tiny_llama),
                                           "engine": {"max_num_seqs": 16}}]}]}
    (tmp / "inferd.yaml").write_text(yaml.safe_dump(config))
    server = ServerProc(tiny_llama, "--config", str(tmp / "inferd.yaml"), "--store", f"sqlite:///{tmp}/s.db",
                        api_key=ADMIN).wait_ready()
    server.store_url = f"sqlite:///{tmp}/s.db"
    yield server
    server.stop()


def admin(srv) -> dict:
    return {"Authorization": f"Bearer {ADMIN}"}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def new_key(srv, team: str, **limits) -> str:
    r = httpx.post(srv.url + "/admin/keys", json={"team": team, **limits}, headers=admin(srv))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["key"].startswith("sk-inferd-") and body["team"] == team
    return body["key"]


def chat(max_tokens: int = 4, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens,
            "ignore_eos": True, **extra}


def usage_of(srv, headers, **params) -> list[dict]:
    r = httpx.get(srv.url + "/v1/usage", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_keys_gate_the_api_and_admin_routes(srv):
    key = new_key(srv, "gate")
    assert httpx.get(srv.url + "/v1/models").status_code == 401
    r = httpx.get(srv.url + "/v1/models", headers=bearer("sk-inferd-not-a-key"))
    assert r.status_code == 401 and "sk-inferd-not-a-key" not in r.text
    assert httpx.get(srv.url + "/v1/models", headers=bearer(key)).status_code == 200
    r = httpx.get(srv.url + "/admin/keys", headers=bearer(key))
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"
    listed = httpx.get(srv.url + "/admin/keys", params={"team": "gate"}, headers=admin(srv)).json()["data"]
    assert len(listed) == 1 and "key" not in listed[0] and key not in json.dumps(listed)
    r = httpx.delete(srv.url + f"/admin/keys/{listed[0]['id']}", headers=admin(srv))
    assert r.status_code == 200
    assert httpx.get(srv.url + "/v1/models", headers=bearer(key)).status_code == 401  # at once on this replica
    assert httpx.delete(srv.url + f"/admin/keys/{listed[0]['id']}", headers=admin(srv)).status_code == 404
    assert key not in srv.output()  # never logged
    r = httpx.post(srv.url + "/admin/keys", json={"team": "gate", "rpm": 0}, headers=admin(srv))
    assert r.status_code == 400 and r.json()["error"]["param"] == "rpm"


def test_requests_per_minute_get_429_with_retry_after(srv):
    key = new_key(srv, "rpm", rpm=3)
    statuses = [httpx.post(srv.url + "/v1/chat/completions", json=chat(1), headers=bearer(key))
                for _ in range(5)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429, 429]
    refused = statuses[-1]
    assert refused.json()["error"]["code"] == "requests_per_minute_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 20  # one request refills in 60 / 3 = 20 s


def test_team_limit_applies_to_all_its_keys(srv):
    assert httpx.put(srv.url + "/admin/teams/shared", json={"rpm": 2}, headers=admin(srv)).status_code == 200
    a, b = new_key(srv, "shared"), new_key(srv, "shared")
    codes = [httpx.post(srv.url + "/v1/chat/completions", json=chat(1), headers=bearer(k)).status_code
             for k in (a, b, a, b)]
    assert codes == [200, 200, 429, 429]
    r = httpx.post(srv.url + "/v1/chat/completions", json=chat(1), headers=bearer(b))
    assert "team 'shared'" in r.json()["error"]["message"]


def test_tokens_per_minute_counts_the_worst_case_and_refunds_the_rest(srv):
    body = chat(100)
    bound = prompt_bound(typed("chat", body)) + 100  # what each request reserves
    probe = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=admin(srv)).json()["usage"]
    used = probe["total_tokens"]  # what each settles at: the difference goes back to the bucket
    tpm = 2 * used + bound + 5  # three fit only thanks to the refunds; without them, two
    assert 3 * bound > tpm
    key = new_key(srv, "tpm", tpm=tpm)
    r = httpx.post(srv.url + "/v1/chat/completions", json=chat(tpm), headers=bearer(key))
    assert r.status_code == 429 and "lower max_tokens" in r.json()["error"]["message"]
    codes = [httpx.post(srv.url + "/v1/chat/completions", json=body, headers=bearer(key)).status_code
             for _ in range(4)]
    assert codes == [200, 200, 200, 429]


async def _fire(srv, key: str, n: int, body: dict) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=srv.url, headers=bearer(key), timeout=120, limits=limits) as c:
        return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(n)))


def test_parallel_limit(srv):
    key = new_key(srv, "parallel", max_parallel=2)
    responses = asyncio.run(_fire(srv, key, 8, chat(24)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and codes.count(429) >= 1
    assert all(r.json()["error"]["code"] == "parallel_requests_exceeded" for r in responses if r.status_code == 429)


def test_budget_holds_under_200_parallel_requests(srv):
    body = chat(8)
    # worst case of one request: the prompt bound at the input price, 8 output tokens at the output price
    worst = (prompt_bound(typed("chat", body)) * PRICE["input"] + 8 * PRICE["output"]) / 1e6
    budget = 50 * worst
    key = new_key(srv, "budget", budget_usd=budget, budget_period="daily")
    responses = asyncio.run(_fire(srv, key, 200, body))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 402]
    assert len(ok) + len(refused) == 200
    assert 40 <= len(ok) < 200 and refused
    assert refused[0].json()["error"]["code"] == "budget_exceeded"
    assert "daily budget" in refused[0].json()["error"]["message"]
    [total] = usage_of(srv, admin(srv), team="budget")
    assert total["cost_usd"] <= budget + worst
    billed = sum((r.json()["usage"]["prompt_tokens"] * PRICE["input"]
                  + r.json()["usage"]["completion_tokens"] * PRICE["output"]) / 1e6 for r in ok)
    assert total["cost_usd"] == pytest.approx(billed, rel=1e-9)
    assert total["requests"] == 200 and total["errors"] == len(refused)


async def _mixed_workload(srv, key: str) -> tuple[dict, set[str]]:
    """Whole, streamed and cancelled requests; returns the usage clients got by request id, and the
    ids of the cancelled streams."""
    given: dict[str, dict] = {}
    cancelled: set[str] = set()
    async with httpx.AsyncClient(base_url=srv.url, headers=bearer(key), timeout=60) as c:
        async def whole(i: int):
            rid = f"whole-{i}"
            r = await c.post("/v1/chat/completions", json=chat(5 + i), headers={"X-Request-Id": rid})
            given[rid] = r.json()["usage"]

        async def completion(i: int):
            rid = f"cmpl-{i}"
            r = await c.post("/v1/completions", headers={"X-Request-Id": rid},
                             json={"model": "tiny", "prompt": ["one two", "three"], "max_tokens": 3 + i,
                                   "ignore_eos": True})
            given[rid] = r.json()["usage"]

        async def streamed(i: int):
            rid = f"stream-{i}"
            body = chat(6 + i, stream=True, stream_options={"include_usage": True})
            async with c.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": rid}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                        chunk = json.loads(line[6:])
                        if not chunk["choices"]:
                            given[rid] = chunk["usage"]

        async def left_early(i: int):
            rid = f"left-{i}"
            cancelled.add(rid)
            body = chat(200, stream=True)
            async with c.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": rid}) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: {")
                    if seen >= 4:
                        break  # closes the connection mid-stream

        await asyncio.gather(*(f(i) for i in range(4) for f in (whole, completion, streamed, left_early)))
    return given, cancelled


def test_ledger_equals_the_usage_clients_were_given(srv, tmp_path):
    key = new_key(srv, "ledger")
    given, cancelled = asyncio.run(_mixed_workload(srv, key))
    assert len(given) == 12

    def ledger_rows():
        from inferd.store import open_store
        from inferd.tenancy import ledger
        store = open_store(srv.store_url)
        try:
            return store.run_sync(lambda tx: ledger.select(tx, "team = ?", ("ledger",)))
        finally:
            store.close()

    rows = wait_for(lambda: (r := ledger_rows()) and len(r) == 16 and r)  # cancelled ones settle just after
    by_id = {r.request_id: r for r in rows}
    for rid, usage in given.items():
        row = by_id[rid]
        assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert row.status == 200 and not row.cancelled and not row.usage_estimated
    for rid in cancelled:
        row = by_id[rid]
        assert row.cancelled and row.status == 499 and row.stream
        assert 3 <= row.completion_tokens < 200 and row.prompt_tokens > 0 and row.cost_usd > 0
    [total] = usage_of(srv, bearer(key))  # a team sees its own usage
    assert total["prompt_tokens"] == sum(r.prompt_tokens for r in rows)
    assert total["completion_tokens"] == sum(r.completion_tokens for r in rows)
    assert total["cancelled"] == 4


def test_a_team_sees_only_its_own_usage(srv):
    a, b = new_key(srv, "seer-a"), new_key(srv, "seer-b")
    for k in (a, b, b):
        assert httpx.post(srv.url + "/v1/chat/completions", json=chat(2), headers=bearer(k)).status_code == 200
    mine = usage_of(srv, bearer(a), group_by="team")
    assert [g["team"] for g in mine] == ["seer-a"] and mine[0]["requests"] == 1
    r = httpx.get(srv.url + "/v1/usage", params={"team": "seer-b"}, headers=bearer(a))
    assert r.status_code == 403
    everyone = {g["team"]: g["requests"] for g in usage_of(srv, admin(srv), group_by="team")}
    assert everyone["seer-a"] == 1 and everyone["seer-b"] == 2


def test_cli_keys_work_on_the_servers_store(srv):
    def cli(*args) -> str:
        out = subprocess.run([sys.executable, "-m", "inferd.cli", *args, "--store", srv.store_url],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    created = json.loads(cli("keys", "create", "--team", "cli-team", "--rpm", "5", "--json"))
    key = created["key"]
    wait_for(lambda: httpx.get(srv.url + "/v1/models", headers=bearer(key)).status_code == 200, timeout=10)
    assert created["id"] in cli("keys", "list", "--team", "cli-team")
    assert key not in cli("keys", "list", "--team", "cli-team")
    cli("keys", "revoke", created["id"])
    wait_for(lambda: httpx.get(srv.url + "/v1/models", headers=bearer(key)).status_code == 401, timeout=10)
    table = cli("usage", "--group-by", "team", "--format", "csv")
    assert table.splitlines()[0].startswith("team,")


def test_response_cache_per_key_and_per_request(srv):
    key = new_key(srv, "cached", cache_ttl=60)
    body = chat(6, temperature=1.0, seed=None)  # sampled: only the cache can make two answers equal
    first = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=bearer(key))
    second = httpx.post(srv.url + "/v1/chat/completions", json={**body, "user": "someone"}, headers=bearer(key))
    assert first.headers["x-inferd-cache"] == "miss" and second.headers["x-inferd-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"] and second.json()["id"] != first.json()["id"]
    # another team never gets this team's answers; a header of 0 turns the cache off for one request
    other = new_key(srv, "uncached")
    assert "x-inferd-cache" not in httpx.post(srv.url + "/v1/chat/completions", json=body,
                                              headers=bearer(other)).headers
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={**bearer(key), "x-inferd-cache-ttl": "0"})
    assert "x-inferd-cache" not in r.headers
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={**bearer(key), "x-inferd-cache-ttl": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cache_ttl"
    [total] = wait_for(lambda: (u := usage_of(srv, admin(srv), team="cached")) and u[0]["requests"] == 4 and u)
    assert total["cache_hits"] == 1
    hit_cost = total["cost_usd"] - 2 * ((first.json()["usage"]["prompt_tokens"] * PRICE["input"]
                                          + first.json()["usage"]["completion_tokens"] * PRICE["output"]) / 1e6)
    assert hit_cost == pytest.approx(0.0, abs=1e-12)  # two answers billed: the miss and the ttl=0 one
    assert total["prompt_tokens"] == 3 * first.json()["usage"]["prompt_tokens"]  # the hit's usage is metered
