"""Many streams at once, and a client that walks away (its KV blocks go back to the pool)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.api.conftest import MODEL, SLOW_KV, ServerProc, wait_for

WORDS = ["fox", "blocks", "batching", "Köln", "emoji 🙂", "def main():", "1234567890", "keys"]


def _requests(count: int) -> list[dict]:
    return [{"prompt": f"{WORDS[i % len(WORDS)]} " * (1 + i % 4) + str(i), "max_tokens": 8 + i % 25}
            for i in range(count)]


def test_64_concurrent_streams_equal_their_non_streamed_text(server):
    reqs = _requests(64)

    async def run():
        client = server.async_client(timeout=60)

        async def streamed(r):
            text, finish, usage = "", None, None
            stream = await client.completions.create(model=MODEL, temperature=0, stream=True,
                                                     stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True}, **r)
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage:
                    usage = chunk.usage
            return text, finish, usage

        async def whole(r):
            out = await client.completions.create(model=MODEL, temperature=0, extra_body={"ignore_eos": True}, **r)
            return out.choices[0].text, out.choices[0].finish_reason, out.usage

        t0 = time.perf_counter()
        got = await asyncio.gather(*[streamed(r) for r in reqs])
        elapsed = time.perf_counter() - t0
        want = await asyncio.gather(*[whole(r) for r in reqs])
        await client.close()
        return got, want, elapsed

    got, want, elapsed = asyncio.run(run())
    tokens = sum(r["max_tokens"] for r in reqs)
    print(f"\n64 concurrent streams: {elapsed:.2f}s, {64 / elapsed:.1f} req/s, {tokens / elapsed:.0f} tok/s")
    for (text, finish, usage), (ref_text, ref_finish, ref_usage), r in zip(got, want, reqs):
        assert text == ref_text
        assert finish == ref_finish == "length"
        assert usage.completion_tokens == ref_usage.completion_tokens == r["max_tokens"]
    m = server.metrics()
    assert m["inferd:num_requests_running"] == 0


@pytest.fixture(scope="module")
def long_server(tiny_llama_slow):
    """n=4 samples of 3000 tokens on the slow tiny model take seconds, so a client that
    walks away always leaves work to abort."""
    srv = ServerProc(tiny_llama_slow, *SLOW_KV).wait_ready()
    yield srv
    srv.stop()


LONG = {"model": MODEL, "prompt": "Paged attention " * 8, "max_tokens": 3000, "n": 4, "ignore_eos": True}


def test_disconnect_mid_stream_aborts_and_frees_kv_blocks(long_server):
    server = long_server
    m = server.metrics()
    total = m["inferd:kv_cache_total_blocks"]
    assert m["inferd:kv_cache_free_blocks"] == total
    aborted_before = m.get("inferd:request_success_total{abort}", 0)
    body = {**LONG, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + "/v1/completions", headers=server.headers, json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(6):
                next(lines)
            in_use = server.metrics()
            assert in_use["inferd:kv_cache_free_blocks"] < total
            assert in_use["inferd:num_requests_running"] == 4
        # leaving the block closes the connection mid-stream
    after = wait_for(lambda: (m := server.metrics())["inferd:kv_cache_free_blocks"] == total and m)
    assert after["inferd:num_requests_running"] == 0 and after["inferd:kv_cache_usage_perc"] == 0
    assert after["inferd:request_success_total{abort}"] == aborted_before + 4
    assert after.get("inferd:request_success_total{length}", 0) == m.get("inferd:request_success_total{length}", 0)


def test_disconnect_while_waiting_for_a_non_streamed_answer_aborts(long_server):
    server = long_server
    before = server.metrics().get("inferd:request_success_total{abort}", 0)
    try:
        httpx.post(server.url + "/v1/completions", headers=server.headers, json=LONG, timeout=0.3)
    except httpx.ReadTimeout:
        pass
    after = wait_for(lambda: (m := server.metrics())["inferd:num_requests_running"] == 0 and m)
    assert after["inferd:kv_cache_free_blocks"] == after["inferd:kv_cache_total_blocks"]
    assert after["inferd:request_success_total{abort}"] == before + 4
