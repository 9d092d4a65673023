"""Prefix caching seen from the API: cached prompt tokens in usage and in /metrics."""

from __future__ import annotations

from tests.api.conftest import MODEL

SYSTEM = "You are a precise assistant. Keep every answer short and correct. " * 4


def test_repeated_system_prompt_is_reported_as_cached(server):
    client = server.client()
    before = server.metrics()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first question"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    messages[1]["content"] = "second question"
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens and cached % 16 == 0  # whole blocks
    # streaming reports it too
    messages[1]["content"] = "third question"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    after = server.metrics()
    assert after["inferd:prefix_cache_hits_total"] - before.get("inferd:prefix_cache_hits_total", 0) == 2 * cached
    queried = after["inferd:prefix_cache_queries_total"] - before.get("inferd:prefix_cache_queries_total", 0)
    assert queried >= first.usage.prompt_tokens + 2 * second.usage.prompt_tokens - 4


def test_completions_usage_counts_cached_tokens_per_prompt(server):
    client = server.client()
    prompt = SYSTEM + "Tell me something."
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    resp = client.completions.create(model=MODEL, prompt=[prompt, prompt + " More."], max_tokens=2)
    assert resp.usage.prompt_tokens_details.cached_tokens >= 2 * 16
