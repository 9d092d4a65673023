"""Bad input gets an OpenAI-style 4xx naming the problem, never a 500; the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.conftest import MODEL


def post(server, path: str, body=None, content: bytes | None = None, headers: dict | None = None):
    h = {**server.headers, **(headers or {})}
    if content is not None:
        return httpx.post(server.url + path, content=content, headers=h)
    return httpx.post(server.url + path, json=body, headers=h)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("content", [b"{bad json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_malformed_bodies_are_400(server, content):
    r = post(server, "/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert error_of(r, 400)["type"] == "invalid_request_error"
    r = post(server, "/v1/chat/completions", content=content)  # no content type at all
    error_of(r, 400)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 2}, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": 10**30}, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 500}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"one": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [5, 99999]}, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0},
     "repetition_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
])
def test_invalid_params_are_400_naming_the_param(server, path, body, param):
    err = error_of(post(server, path, body), 400)
    assert err["param"] == param, err


def test_non_finite_numbers_are_400(server):
    r = post(server, "/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
             headers={"Content-Type": "application/json"})
    assert error_of(r, 400)["param"] == "temperature"


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().completions.create(model="gpt-17", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    error_of(httpx.get(server.url + "/v1/models/gpt-17", headers=server.headers), 404)
    error_of(httpx.get(server.url + "/no/such/route", headers=server.headers), 404)
    error_of(httpx.get(server.url + "/no/such/route"), 401)  # one rule: no key, no answer
    assert httpx.delete(server.url + "/v1/completions", headers=server.headers).status_code == 405


def test_prompt_over_context_is_400_with_token_counts(server, tokenizer):
    prompt = "Paged attention stores keys and values in fixed-size blocks. " * 60
    n = len(tokenizer.encode(prompt))
    assert n > 512
    err = error_of(post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 4}), 400)
    assert "512" in err["message"] and str(n) in err["message"]
    short = "Paged attention stores keys"
    err = error_of(post(server, "/v1/completions", {"prompt": short, "max_tokens": 600}), 400)
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    assert "600" in err["message"] and str(len(tokenizer.encode(short))) in err["message"]
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])


def test_api_key_is_required_on_v1(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdC1rZXk="}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert error_of(r, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(server.url + "/v1/models", headers={"X-Api-Key": server.api_key}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


def test_server_still_serves_after_bad_input(server):
    for content in (b"{", b"null", b'{"prompt": {"a": 1}}', b'{"prompt": "x", "n": 1e9}'):
        assert post(server, "/v1/completions", content=content,
                    headers={"Content-Type": "application/json"}).status_code == 400
    r = server.client().completions.create(model=MODEL, prompt="still alive", max_tokens=3,
                                         extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert httpx.get(server.url + "/health").status_code == 200
