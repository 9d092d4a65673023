"""Each endpoint through the official OpenAI SDK (sync, async, streaming) and raw httpx."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
import transformers

from inferd import __version__
from tests.api.conftest import MODEL

PROMPT = "The quick brown fox"


def sse_events(resp: httpx.Response) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "inferd"
    # the model's file or folder name, never where it lies on the server's disk
    assert card.root == server.model.name and "/" not in card.root


def test_health_version_metrics_need_no_key(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert httpx.get(server.url + "/version").json() == {"version": __version__}
    text = httpx.get(server.url + "/metrics").text
    for name in ["inferd:time_to_first_token_seconds", "inferd:inter_token_latency_seconds",
                 "inferd:e2e_request_latency_seconds", "inferd:request_queue_time_seconds",
                 "inferd:num_requests_running", "inferd:num_requests_waiting", "inferd:kv_cache_usage_perc",
                 "inferd:prompt_tokens_total", "inferd:generation_tokens_total"]:
        assert name in text, name


def test_request_id_is_echoed_or_generated(server):
    r = httpx.get(server.url + "/v1/models", headers={**server.headers, "X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.post(server.url + "/v1/completions", headers={**server.headers, "X-Request-Id": "my-req-7"},
                   json={"prompt": "hi", "max_tokens": 2})
    assert r.headers["x-request-id"] == "my-req-7" and r.json()["id"] == "cmpl-my-req-7"
    r = httpx.get(server.url + "/health")
    assert len(r.headers["x-request-id"]) >= 16
    r = httpx.post(server.url + "/v1/completions", content=b"{", headers={"X-Request-Id": "bad-1"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "bad-1"


def test_completion_prompt_forms(server, tokenizer):
    client = server.client()
    ids = tokenizer.encode(PROMPT)
    kw = dict(model=MODEL, max_tokens=8, temperature=0)
    text = client.completions.create(prompt=PROMPT, **kw)
    by_ids = client.completions.create(prompt=ids, **kw)
    assert text.choices[0].text == by_ids.choices[0].text
    assert text.usage.prompt_tokens == len(ids) and text.usage.completion_tokens == 8
    assert text.usage.total_tokens == len(ids) + 8
    assert text.choices[0].finish_reason == "length"
    many = client.completions.create(prompt=[PROMPT, "def main():"], n=2, seed=3, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == text.choices[0].text
    many_ids = client.completions.create(prompt=[ids, tokenizer.encode("def main():")], **kw)
    assert [c.text for c in many_ids.choices] == [many.choices[0].text, many.choices[2].text]
    assert many_ids.usage.completion_tokens == 16


def test_echo_logprobs_with_max_tokens_0_match_transformers(server, tiny_llama, tokenizer):
    """lm-eval's loglikelihood request: the prompt's own token logprobs."""
    ids = tokenizer.encode("Paged attention stores keys and values")
    r = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True,
                                           logprobs=1, temperature=0)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text == tokenizer.decode(ids, skip_special_tokens=False)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=2e-4)
    for i in range(1, len(ids)):
        best = max(lp.top_logprobs[i].values())
        assert best == pytest.approx(logprobs[i - 1].max().item(), abs=2e-4)


def test_completion_logprobs_for_generated_tokens(server):
    r = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token_lp <= 0 and 1 <= len(top) <= 3
        assert token_lp == pytest.approx(max(top.values()))  # greedy: the sampled token is the best
    assert lp.text_offset[0] == len(PROMPT)


def test_streaming_completion_equals_non_streaming(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = httpx.post(server.url + "/v1/completions", headers=server.headers, json=body).json()
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    chunks = events[:-2]
    assert all(c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    sdk = server.client().completions.create(stream=True, **{k: v for k, v in body.items() if k != "ignore_eos"},
                                             extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in sdk) == full["choices"][0]["text"]


def test_streaming_echo_with_logprobs(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 0}
    full = httpx.post(server.url + "/v1/completions", headers=server.headers, json=body).json()["choices"][0]
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers,
                      json={**body, "stream": True}) as resp:
        chunks = sse_events(resp)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [t for c in chunks for t in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == full["logprobs"]["tokens"] and offsets == full["logprobs"]["text_offset"]


def test_chat_sync_and_streaming(server):
    client = server.client()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Tell me more."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and r.usage.completion_tokens <= 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    same = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert same.choices[0].message.content == choice.message.content
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_async_n_seed_stop_and_penalties(server):
    async def run():
        client = server.async_client()
        messages = [{"role": "user", "content": [{"type": "text", "text": "Count with me"}]}]
        kw = dict(model=MODEL, messages=messages, max_tokens=12, temperature=1.0, top_p=0.9, seed=11, n=3,
                  presence_penalty=0.5, frequency_penalty=0.5, extra_body={"ignore_eos": True})
        a, b = await asyncio.gather(client.chat.completions.create(**kw), client.chat.completions.create(**kw))
        await client.close()
        return a, b

    a, b = asyncio.run(run())
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [c.message.content for c in b.choices]  # seeded: reproducible
    assert a.usage.completion_tokens == 36


def test_stop_string_cuts_the_text(server):
    client = server.client()
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = text[5:8]
    assert stop.strip()
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]


def test_chat_logprobs_format(server):
    r = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy
        assert entry.bytes == list(entry.token.encode())


def test_chat_continues_a_final_assistant_message(server, tokenizer):
    """vLLM's continue_final_message: the answer goes on from a partial assistant message (a prefill)."""
    messages = [{"role": "user", "content": "Hello!"}]
    rendered = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "Sure, here"}],
                                             add_generation_prompt=False, continue_final_message=True)
    assert rendered == tokenizer.apply_chat_template(messages) + "Sure, here"
    client = server.client()
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, extra_body={"ignore_eos": True})
    tokens = [t.token for t in whole.choices[0].logprobs.content]
    head = "".join(tokens[:3])
    rest = client.chat.completions.create(
        model=MODEL, messages=[*messages, {"role": "assistant", "content": head}], max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True, "continue_final_message": True, "add_generation_prompt": False})
    assert head + rest.choices[0].message.content == whole.choices[0].message.content
    for bad in ({"continue_final_message": True, "add_generation_prompt": False, "messages": messages},
                {"continue_final_message": True, "messages": [*messages, {"role": "assistant", "content": "x"}]}):
        r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers,
                       json={"model": MODEL, "max_tokens": 2, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
