"""Request priority over HTTP: a batch at priority 10 does not hold up an interactive request.

A server running at most 4 requests gets 12 long streaming completions at
`priority: 10` (the Batch API's level); an interactive chat request at the default
priority 0 must then see its first token about as soon as on the idle server.
A FIFO engine would queue it behind the 8 waiting batch requests: two whole
waves of 800-token generations, seconds here. The batch still completes in full
(its preempted requests are recomputed), and a bad `priority` is a clear 400.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import pytest

from tests.api.conftest import MODEL, ServerProc, wait_for

MAX_NUM_SEQS = 4
BATCH_LINES = 12
BATCH_TOKENS = 800
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Quick question"}], "max_tokens": 4,
        "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def srv(tiny_llama_long):
    s = ServerProc(tiny_llama_long, "--max-num-seqs", str(MAX_NUM_SEQS), api_key=None).wait_ready()
    yield s
    s.stop()


async def _ttft(client: httpx.AsyncClient, url: str, **extra) -> float:
    """Seconds from sending a streamed chat request to its first event (the first token)."""
    t0 = time.perf_counter()
    async with client.stream("POST", url + "/v1/chat/completions", json={**CHAT, **extra}) as resp:
        assert resp.status_code == 200, await resp.aread()
        ttft = None
        async for line in resp.aiter_lines():  # read to the end: nothing is aborted
            if ttft is None and line.startswith("data: "):
                ttft = time.perf_counter() - t0
    return ttft


async def _batch_line(client: httpx.AsyncClient, url: str, i: int) -> dict:
    body = {"model": MODEL, "prompt": f"Batch line {i}: summarise the ledger", "max_tokens": BATCH_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True, "priority": 10,
            "stream_options": {"include_usage": True}}
    finish, usage = None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                finish = c["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    return {"finish": finish, "usage": usage}


def _ms(times: list[float]) -> list[float]:
    return [round(t * 1000, 1) for t in times]


def test_interactive_ttft_stays_near_idle_while_a_low_priority_batch_runs(srv):
    def metric(name: str) -> float:
        return srv.metrics().get(name, 0)

    def batch_queued() -> bool:  # every batch line is in the engine: 4 running, 8 waiting
        m = srv.metrics()
        return (m["inferd:num_requests_running"] == MAX_NUM_SEQS
                and m["inferd:num_requests_waiting"] == BATCH_LINES - MAX_NUM_SEQS)

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            await _ttft(client, srv.url)  # warm-up
            idle = [await _ttft(client, srv.url) for _ in range(5)]
            preempted = await asyncio.to_thread(metric, "inferd:num_preemptions_total")
            batch = [asyncio.create_task(_batch_line(client, srv.url, i)) for i in range(BATCH_LINES)]
            await asyncio.to_thread(wait_for, batch_queued)
            busy = [await _ttft(client, srv.url) for _ in range(3)]
            waiting_after = await asyncio.to_thread(metric, "inferd:num_requests_waiting")
            lines = await asyncio.gather(*batch)
            preempted = await asyncio.to_thread(metric, "inferd:num_preemptions_total") - preempted
            return idle, busy, waiting_after, lines, preempted

    t0 = time.perf_counter()
    idle, busy, waiting_after, lines, preempted = asyncio.run(run())
    idle_ttft, busy_ttft = statistics.median(idle), max(busy)  # every interactive request must get in
    print(f"\nTTFT idle {idle_ttft * 1000:.1f} ms {_ms(idle)}; under a {BATCH_LINES}-line priority-10 "
          f"batch at most {busy_ttft * 1000:.1f} ms {_ms(busy)}; {preempted:.0f} preemptions; "
          f"{time.perf_counter() - t0:.1f}s")
    assert busy_ttft < 5 * idle_ttft + 0.3
    assert waiting_after > 0  # the batch was still queued behind the interactive requests
    # the first interactive request took a batch request's slot; a later one may find the slot its
    # predecessor left before the preempted line is scheduled again, and need no preemption
    assert preempted >= 1
    for line in lines:  # the batch lost nothing: preempted lines were recomputed and completed
        assert line["finish"] == "length" and line["usage"]["completion_tokens"] == BATCH_TOKENS


@pytest.mark.parametrize("value", [1001, -1001, 1.5, "high", True])
def test_a_bad_priority_is_a_400_naming_it(srv, value):
    for path, body in [("/v1/chat/completions", {**CHAT, "stream": False}),
                       ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})]:
        r = httpx.post(srv.url + path, json={**body, "priority": value}, timeout=10)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "priority" and "priority" in err["message"]


def test_priority_is_accepted_in_range_and_null_means_default(srv):
    for value in (-1000, 0, 10, 1000, None):
        r = httpx.post(srv.url + "/v1/completions", timeout=10,
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "priority": value,
                             "ignore_eos": True})  # a sampled EOS could end it after 1
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
