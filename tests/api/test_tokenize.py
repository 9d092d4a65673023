"""vLLM's tokenizer endpoints, which lm-eval's `tokenizer_backend=remote` uses."""

from __future__ import annotations

import httpx

from tests.api.conftest import MODEL


def test_tokenize_and_detokenize_round_trip(server):
    h = server.headers
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "The quick brown fox"}, headers=h)
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] > 0
    r = httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]}, headers=h)
    assert r.json() == {"prompt": "The quick brown fox"}
    # the counts agree with what a completion bills
    usage = server.client().completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=1).usage
    assert usage.prompt_tokens == body["count"]


def test_tokenize_chat_messages_and_tokenizer_info(server):
    h = server.headers
    messages = [{"role": "user", "content": "hi"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": messages}, headers=h)
    usage = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage
    assert r.json()["count"] == usage.prompt_tokens
    info = httpx.get(server.url + "/tokenizer_info", headers=h).json()
    assert info["eos_token"] == "<|endoftext|>" and "im_start" in info["chat_template"]


def test_tokenize_rejects_bad_input(server):
    h = server.headers
    assert httpx.post(server.url + "/tokenize", json={}, headers=h).status_code == 400
    r = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x", "model": "nope"}, headers=h).status_code == 404
