"""Overload (503 + Retry-After), engine-core death (503, fail fast) and SIGTERM shutdown.

Both servers run the 4096-token tiny Llama so a long generation lasts seconds.
`busy` runs at most 2 requests with a waiting queue of 1 and a 1.5 s shutdown
timeout; `doomed` gets its engine core killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.conftest import MODEL, SLOW_KV, ServerProc, wait_for

SHUTDOWN_TIMEOUT = 1.5
LONG = {"model": MODEL, "prompt": "hi", "max_tokens": 4000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def servers(tiny_llama_slow):
    busy = ServerProc(tiny_llama_slow, *SLOW_KV, "--max-num-seqs", "2", "--max-waiting-requests", "1",
                      "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), api_key=None)
    doomed = ServerProc(tiny_llama_slow, *SLOW_KV, api_key=None)
    busy.wait_ready(), doomed.wait_ready()  # both started before either is awaited
    yield busy, doomed
    busy.stop(), doomed.stop()


@pytest.fixture(scope="module")
def busy(servers):
    return servers[0]


@pytest.fixture(scope="module")
def doomed(servers):
    return servers[1]


class StreamReader(threading.Thread):
    """Reads one streamed completion in the background, keeping its SSE events."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list = []
        self.first = threading.Event()
        self.error: Exception | None = None

    def run(self):
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.first.set()
        except Exception as e:  # noqa: BLE001
            self.error = e
        finally:
            self.first.set()


def test_overload_is_503_with_retry_after(busy):
    async def run():
        async with httpx.AsyncClient(base_url=busy.url, timeout=60) as client:
            async def hold():
                async with client.stream("POST", "/v1/completions", json=LONG) as resp:
                    async for _ in resp.aiter_lines():
                        pass

            holders = [asyncio.create_task(hold()) for _ in range(3)]  # 2 running + 1 waiting: full
            await asyncio.to_thread(wait_for, lambda: (m := busy.metrics())["inferd:num_requests_running"] == 2
                                    and m["inferd:num_requests_waiting"] == 1)
            rejected = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            for t in holders:
                t.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return rejected

    r = asyncio.run(run())
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"
    assert 1 <= int(r.headers["retry-after"]) <= 30
    # the held streams were dropped by their client: their blocks come back and new work is accepted
    wait_for(lambda: (m := busy.metrics())["inferd:kv_cache_free_blocks"] == m["inferd:kv_cache_total_blocks"])
    ok = busy.client().completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 2


def test_engine_death_gives_503_and_requests_fail_fast(doomed):
    core = doomed.core_pid()
    reader = StreamReader(doomed.url, LONG)
    reader.start()
    assert reader.first.wait(10) and reader.events
    os.kill(core, signal.SIGKILL)
    killed = time.monotonic()
    reader.join(5)
    assert not reader.is_alive(), "the in-flight stream hung after the engine died"
    assert time.monotonic() - killed < 3
    last = reader.events[-1]
    assert last != "[DONE]" and last["error"]["code"] == "engine_unavailable"

    health = wait_for(lambda: (r := httpx.get(doomed.url + "/health")).status_code == 503 and r)
    assert "exit code" in health.json()["reason"]
    client = doomed.client()
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert e.value.status_code == 503 and e.value.body["code"] == "engine_unavailable"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    assert time.monotonic() - t0 < 2
    assert "inferd:engine_healthy{" in httpx.get(doomed.url + "/metrics").text
    assert doomed.metrics()["inferd:engine_healthy"] == 0
    assert doomed.stop(timeout=15) == 0  # a server with a dead engine still shuts down cleanly


def test_sigterm_drains_then_aborts_and_exits(busy):
    core = busy.core_pid()
    long = StreamReader(busy.url, LONG)
    long.start()
    assert long.first.wait(10)
    # the short request is sized from this machine's measured token rate, so that it needs
    # about a third of the drain time here, however fast or loaded the CPU is
    before, t0 = len(long.events), time.monotonic()
    time.sleep(0.5)
    rate = (len(long.events) - before) / (time.monotonic() - t0)
    short_tokens = max(3, min(150, int(rate * SHUTDOWN_TIMEOUT / 3)))
    short = StreamReader(busy.url, {**LONG, "max_tokens": short_tokens})
    short.start()
    assert short.first.wait(10)
    busy.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    short.join(10)
    long.join(10)
    assert busy.proc.wait(15) == 0
    elapsed = time.monotonic() - t0
    assert elapsed < SHUTDOWN_TIMEOUT + 5
    # the short request finished normally during the drain ...
    assert short.error is None and short.events[-1] == "[DONE]"
    assert short.events[-2]["choices"][0]["finish_reason"] == "length"
    # ... the long one was cut at the timeout, and says so instead of ending like a success
    assert long.events[-1] != "[DONE]" and long.events[-1]["error"]["code"] == "shutting_down"
    assert not Path(f"/proc/{core}").exists() or "Z" in Path(f"/proc/{core}/stat").read_text().split()[2]
    with pytest.raises(httpx.ConnectError):
        httpx.get(busy.url + "/health")
