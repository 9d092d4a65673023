"""Structured output through the OpenAI SDK against `inferd serve` on the embedded model.

Every answer under a constraint must be valid, whatever the model would rather
write: the SDK's `parse()` with pydantic models (nested objects, arrays, enums,
required fields, string patterns, number bounds), streamed and not;
`json_object`; vLLM's `choice` and `regex`. Schemas the compiler cannot enforce
are refused with the reason, never weakened.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Annotated

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.api.conftest import MODEL


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=30)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    favourite: Color
    address: Address


class Inventory(BaseModel):
    items: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)
    total: float = Field(ge=0, le=1000)
    in_stock: bool


class Verdict(BaseModel):
    answer: Color
    confidence: int = Field(ge=1, le=5)
    note: str | None = Field(default=None, max_length=20)


SCHEMAS = [(Person, "Invent a person who lives somewhere."), (Inventory, "List what is in a small shop."),
           (Verdict, "Which color is the sky?")]


def _ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("model,prompt", SCHEMAS, ids=[m.__name__ for m, _ in SCHEMAS])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_parse_returns_a_valid_object(embedded, model, prompt, temperature):
    client = embedded.client()
    for seed in range(3):
        done = client.chat.completions.parse(model=MODEL, messages=_ask(prompt), response_format=model,
                                             temperature=temperature, seed=seed, max_tokens=200)
        choice = done.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, model)


@pytest.mark.parametrize("model,prompt", SCHEMAS[:2], ids=[m.__name__ for m, _ in SCHEMAS[:2]])
def test_a_streamed_answer_is_valid_too(embedded, model, prompt):
    client = embedded.client()
    with client.chat.completions.stream(model=MODEL, messages=_ask(prompt), response_format=model,
                                        temperature=1.0, seed=7, max_tokens=200) as stream:
        text = "".join(e.delta for e in stream if e.type == "content.delta")
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "stop"
    assert model.model_validate_json(text) == final.choices[0].message.parsed


def test_json_object_always_parses(embedded):
    client = embedded.client()
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=_ask("Describe a cat."), seed=seed,
                                           temperature=1.0, max_tokens=120,
                                           response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:  # cut by max_tokens: says so, and is a prefix that never closed
            assert r.choices[0].finish_reason == "length"


def test_choice_and_regex_always_match(embedded):
    client = embedded.client()
    choices = ["positive", "negative", "neutral"]
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=_ask("I love this!"), seed=seed, temperature=1.5,
                                           max_tokens=10, extra_body={"structured_outputs": {"choice": choices}})
        assert r.choices[0].message.content in choices
        c = client.completions.create(model=MODEL, prompt="Call me at", seed=seed, temperature=1.5, max_tokens=30,
                                      extra_body={"guided_regex": r"[0-9]{3}-[0-9]{4}"})
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", c.choices[0].text)


def test_max_tokens_inside_an_object_ends_with_length(embedded):
    r = embedded.client().chat.completions.create(
        model=MODEL, messages=_ask("Invent a person."), max_tokens=4, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}})
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)


@pytest.mark.parametrize("schema,reason", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "strin"}, "strin"),
    ({"type": "string", "pattern": "[a-"}, "regex"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_why(embedded, schema, reason):
    r = httpx.post(embedded.url + "/v1/chat/completions", headers=embedded.headers, timeout=30, json={
        "model": MODEL, "messages": _ask("hi"),
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and reason in error["message"]


def test_two_constraints_or_a_bad_grammar_are_400(embedded):
    for body, param in [({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
                        ({"structured_outputs": {"grammar": "start: 'a' | "}}, "structured_outputs"),
                        ({"structured_outputs": {"choice": []}}, "structured_outputs")]:
        r = httpx.post(embedded.url + "/v1/chat/completions", headers=embedded.headers, timeout=30,
                       json={"model": MODEL, "messages": _ask("hi"), **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_lark_grammar_is_followed(embedded):
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]?/'
    r = embedded.client().chat.completions.create(model=MODEL, messages=_ask("What is 6 times 7?"), max_tokens=20,
                                                  temperature=1.0, extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"The answer is [1-9][0-9]?\.", r.choices[0].message.content)


def test_logit_bias_forces_and_bans_tokens(embedded):
    client = embedded.client()
    tokens = httpx.post(embedded.url + "/tokenize", headers=embedded.headers,
                        json={"model": MODEL, "prompt": " banana", "add_special_tokens": False}).json()["tokens"]
    forced = client.completions.create(model=MODEL, prompt="My favourite fruit is", max_tokens=3, temperature=0,
                                       logit_bias={str(tokens[0]): 100})
    piece = httpx.post(embedded.url + "/detokenize", headers=embedded.headers,
                       json={"model": MODEL, "tokens": tokens[:1]}).json()["prompt"]
    assert forced.choices[0].text.startswith(piece)
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0)
    first = httpx.post(embedded.url + "/tokenize", headers=embedded.headers,
                       json={"model": MODEL, "prompt": plain.choices[0].text, "add_special_tokens": False}).json()["tokens"]
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0,
                                       logit_bias={str(first[0]): -100})
    assert banned.choices[0].text != plain.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, logit_bias={"10000000": 5})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, logit_bias={"5": 500})
