"""Degradation under load: a flooded local model sends the excess to its degrade target.

A small local Llama that runs two requests at a time has a time-to-first-token
SLO and a remote degrade target (a mock upstream). It is the slow tiny model with
200-token answers, so 16 requests two at a time need several answers' time in a
row. After a short warm-up (so the gateway has seen how fast the engine drains),
16 concurrent streams arrive at once: the ones the local engine can start within
the SLO stay local and get their first token within it; the rest are answered by
the degrade target with the `x-inferd-degraded-from` header. Without a degrade
target the excess gets 503 with a `Retry-After`, never a place at the end of a
long queue.

The SLO is not a number of seconds fixed here: CPUs differ several-fold in speed.
A calibration server with the same engine first measures how long one answer
takes on this machine, unloaded (`answer_s`), and the SLO is `SLO_ANSWERS` of
those. A request that has to wait for k slots to free waits about k/2 answers;
the gateway predicts at least k answers from its sequential warm-up, so it accepts
at most SLO_ANSWERS queued requests, which start within about SLO_ANSWERS / 2
answers, half the SLO, on any machine; what the test checks is the behaviour,
not the CPU.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest
import yaml

from tests.api.conftest import SLOW_KV, ServerProc
from tests.gateway.mock_upstream import MockUpstream

SLO_ANSWERS = 4  # the SLO, in unloaded answers of the local engine on this machine
ENGINE = {"max_num_seqs": 2}
BODY = {"messages": [{"role": "user", "content": "count to ten"}], "max_tokens": 200, "ignore_eos": True,
        "stream": True}


def measure_answer_seconds(model) -> float:
    """The median time one whole answer takes on an unloaded engine like the flooded one."""
    srv = ServerProc(model, *SLOW_KV, "--max-num-seqs", str(ENGINE["max_num_seqs"]), api_key=None).wait_ready()
    try:
        async def answers() -> list[float]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                await one(client, "tiny")  # warm-up
                return [(await one(client, "tiny"))["total"] for _ in range(3)]
        return statistics.median(asyncio.run(answers()))
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def flooded(tiny_llama_slow, tmp_path_factory):
    slo_s = SLO_ANSWERS * measure_answer_seconds(tiny_llama_slow)
    mock = MockUpstream(model="up-small").start()
    def local():
        return [{"provider": "local", "model": str(tiny_llama_slow), "engine": dict(ENGINE)}]
    config = {"models": [
        {"name": "tiny", "slo_ttft_ms": slo_s * 1000, "degrade_to": "small", "deployments": local()},
        {"name": "tiny-strict", "slo_ttft_ms": slo_s * 1000, "deployments": local()},
        {"name": "small", "deployments": [{"provider": "openai", "base_url": mock.openai_base_url,
                                           "model": "up-small"}]},
    ]}
    path = tmp_path_factory.mktemp("degrade") / "inferd.yaml"
    path.write_text(yaml.safe_dump(config))
    srv = ServerProc(tiny_llama_slow, *SLOW_KV, "--config", str(path), api_key=None).wait_ready()
    yield srv, mock, slo_s
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
    result["total"] = time.monotonic() - t0
    return result


async def flood(url: str, model: str, n: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for _ in range(3):  # warm-up, one at a time: the gateway learns the unloaded TTFT and drain rate
            await one(client, model)
        return await asyncio.gather(*(one(client, model) for _ in range(n)))


def test_flood_degrades_the_excess_and_local_requests_keep_their_slo(flooded):
    srv, mock, slo_s = flooded
    results = asyncio.run(flood(srv.url, "tiny", 16))
    assert all(r["status"] == 200 for r in results)
    local = [r for r in results if r["model"] == "tiny"]
    degraded = [r for r in results if r["headers"].get("x-inferd-degraded-from") == "tiny"]
    assert len(local) >= 2, "the local engine took nothing"
    assert len(degraded) >= 4 and all(r["model"] == "up-small" for r in degraded)
    assert len(local) + len(degraded) == 16
    worst = max(r["ttft"] for r in local)
    assert worst <= slo_s, f"an accepted local request missed the SLO: {worst:.2f}s > {slo_s:.2f}s"
    metrics = httpx.get(srv.url + "/metrics").text
    assert f'inferd:gateway_degradations_total{{from_group="tiny",to_group="small"}} {float(len(degraded))}' in metrics


def test_without_a_degrade_target_the_excess_gets_503_with_retry_after(flooded):
    srv, _, slo_s = flooded
    results = asyncio.run(flood(srv.url, "tiny-strict", 16))
    refused = [r for r in results if r["status"] == 503]
    served = [r for r in results if r["status"] == 200]
    assert len(served) >= 2 and len(refused) >= 4
    assert all(1 <= int(r["headers"]["retry-after"]) <= 60 for r in refused)
    assert max(r["ttft"] for r in served) <= slo_s
