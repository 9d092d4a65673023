"""Tool calling through the OpenAI SDK and LangChain against `inferd serve` on the embedded model."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api.conftest import MODEL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_call(call, name: str):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == name
    args = json.loads(call.function.arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    return args


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_are_valid_against_the_functions_schemas(embedded, choice):
    client = embedded.client()
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                           temperature=1.0, seed=seed, max_tokens=150)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        for call in c.message.tool_calls:
            _check_call(call, call.function.name)
            if isinstance(choice, dict):
                assert call.function.name == "get_time"


def test_no_parallel_calls_means_one_call(embedded):
    r = embedded.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}],
        tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=150)
    assert len(r.choices[0].message.tool_calls) == 1


def test_streamed_call_deltas_add_up_to_the_whole_answer(embedded):
    client = embedded.client()
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=150)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"name": "", "arguments": "", "id": None})
                if piece.id:
                    assert call["id"] is None  # the id comes once, with the name
                    call["id"] = piece.id
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]


def test_a_tool_loop_with_the_sdk(embedded):
    client = embedded.client()
    messages = list(ASK)
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=150).choices[0].message
    call = first.tool_calls[0]
    messages += [first.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    for stream in (False, True):
        answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                                temperature=0, max_tokens=60, stream=stream)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
        else:
            assert answer.choices[0].finish_reason in ("stop", "length")
            text = answer.choices[0].message.content
        assert text and "<tool_call>" not in text


def test_auto_may_answer_in_text_or_call(embedded):
    client = embedded.client()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                       tools=[WEATHER], temperature=0, max_tokens=40)
    c = r.choices[0]
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls"
        _check_call(c.message.tool_calls[0], "get_weather")
    else:
        assert c.message.content and c.finish_reason in ("stop", "length")


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
])
def test_bad_tool_requests_are_400(embedded, body, param):
    r = httpx.post(embedded.url + "/v1/chat/completions", headers=embedded.headers, timeout=30,
                   json={"model": MODEL, "messages": ASK, "tools": [WEATHER], **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_langchain_bind_tools_and_structured_output(embedded):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    llm = langchain_openai.ChatOpenAI(base_url=embedded.url + "/v1", api_key=embedded.api_key, model=MODEL,
                                      temperature=0, max_tokens=150, max_retries=0)

    class GetWeather(BaseModel):
        """The current weather in a city."""
        city: str = Field(max_length=40)

    msg = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather in Oslo?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "GetWeather" and "city" in msg.tool_calls[0]["args"]

    class City(BaseModel):
        name: str = Field(max_length=40)
        country: str = Field(max_length=40)

    for method in ("json_schema", "function_calling"):
        city = llm.with_structured_output(City, method=method).invoke("Name a city in Japan.")
        assert isinstance(city, City)
