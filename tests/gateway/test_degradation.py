"""Degradation under load: a flooded local model sends the excess to its degrade target.

A small local Llama that runs two requests at a time has a time-to-first-token
SLO and a remote degrade target (a mock upstream). It is the slow tiny model with
200-token answers (~0.3 s each), so 16 requests two at a time need several seconds
however fast the kernels get. After a short warm-up (so
the gateway has seen how fast the engine drains), 16 concurrent streams arrive
at once: the ones the local engine can start within the SLO stay local and
get their first token within it; the rest are answered by the degrade target
with the `x-inferd-degraded-from` header. Without a degrade target the excess
gets 503 with a `Retry-After`, never a place at the end of a long queue.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import yaml

from tests.api.conftest import SLOW_KV, ServerProc
from tests.gateway.mock_upstream import MockUpstream

SLO_S = 1.5
BODY = {"messages": [{"role": "user", "content": "count to ten"}], "max_tokens": 200, "ignore_eos": True,
        "stream": True}


@pytest.fixture(scope="module")
def flooded(tiny_llama_slow, tmp_path_factory):
    mock = MockUpstream(model="up-small").start()
    config = {"models": [
        {"name": "tiny", "slo_ttft_ms": SLO_S * 1000, "degrade_to": "small",
         "deployments": [{"provider": "local", "model": str(tiny_llama_slow), "engine": {"max_num_seqs": 2}}]},
        {"name": "tiny-strict", "slo_ttft_ms": SLO_S * 1000,
         "deployments": [{"provider": "local", "model": str(tiny_llama_slow), "engine": {"max_num_seqs": 2}}]},
        {"name": "small", "deployments": [{"provider": "openai", "base_url": mock.openai_base_url,
                                           "model": "up-small"}]},
    ]}
    path = tmp_path_factory.mktemp("degrade") / "inferd.yaml"
    path.write_text(yaml.safe_dump(config))
    srv = ServerProc(tiny_llama_slow, *SLOW_KV, "--config", str(path), api_key=None).wait_ready()
    yield srv, mock
    srv.stop()
    mock.stop()


async def one(client: httpx.AsyncClient, model: str) -> dict:
    t0 = time.monotonic()
    async with client.stream("POST", "/v1/chat/completions", json={**BODY, "model": model}) as r:
        result = {"status": r.status_code, "headers": r.headers, "ttft": None, "model": None}
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line.replace(" ", "") and result["ttft"] is None:
                if '"content":""' not in line.replace(" ", ""):
                    result["ttft"] = time.monotonic() - t0
            if line.startswith("data: {") and result["model"] is None:
                result["model"] = httpx.Response(200, content=line[6:]).json()["model"]
    return result


async def flood(url: str, model: str, n: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for _ in range(3):  # warm-up, one at a time: the gateway learns the unloaded TTFT and drain rate
            await one(client, model)
        return await asyncio.gather(*(one(client, model) for _ in range(n)))


def test_flood_degrades_the_excess_and_local_requests_keep_their_slo(flooded):
    srv, mock = flooded
    results = asyncio.run(flood(srv.url, "tiny", 16))
    assert all(r["status"] == 200 for r in results)
    local = [r for r in results if r["model"] == "tiny"]
    degraded = [r for r in results if r["headers"].get("x-inferd-degraded-from") == "tiny"]
    assert len(local) >= 2, "the local engine took nothing"
    assert len(degraded) >= 4 and all(r["model"] == "up-small" for r in degraded)
    assert len(local) + len(degraded) == 16
    worst = max(r["ttft"] for r in local)
    assert worst <= SLO_S, f"an accepted local request missed the SLO: {worst:.2f}s"
    metrics = httpx.get(srv.url + "/metrics").text
    assert f'inferd:gateway_degradations_total{{from_group="tiny",to_group="small"}} {float(len(degraded))}' in metrics


def test_without_a_degrade_target_the_excess_gets_503_with_retry_after(flooded):
    srv, _ = flooded
    results = asyncio.run(flood(srv.url, "tiny-strict", 16))
    refused = [r for r in results if r["status"] == 503]
    served = [r for r in results if r["status"] == 200]
    assert len(served) >= 2 and len(refused) >= 4
    assert all(1 <= int(r["headers"]["retry-after"]) <= 60 for r in refused)
    assert max(r["ttft"] for r in served) <= SLO_S
