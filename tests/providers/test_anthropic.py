"""AnthropicDeployment: request and answer translation, the Messages stream, and its faults."""

from __future__ import annotations

import json

import pytest

from inferd.providers.anthropic import (AnthropicConfig, AnthropicDeployment, ChunkTranslator, to_chat_completion,
                                        to_messages_request, to_usage)
from inferd.wire.errors import ErrorKind, InferdError
from tests.gateway.mock_upstream import WORDS, Fault
from tests.providers.conftest import FAST, UPSTREAM_MODEL, collect, fails, run
from tests.typed import typed

MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "no lists"}]},
            {"role": "user", "content": "hello there"},
            {"role": "user", "content": [{"type": "text", "text": "and again"}]},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "three words please"}]
CHAT = {"model": "public-name", "max_tokens": 3, "messages": MESSAGES}
REPLY = " ".join(WORDS[:3])


def deployment(mock, **config):
    def make() -> AnthropicDeployment:
        base = {"name": "claude", "base_url": mock.url, "model": UPSTREAM_MODEL, "api_key": "sk-ant",
                "timeouts": FAST}
        return AnthropicDeployment(AnthropicConfig(**{**base, **config}))
    return make


def chat(d):
    return d.request(typed("chat", CHAT))


def stream_chat(d):
    return collect(d, "chat", CHAT)


def test_request_is_translated_both_ways(mock):
    body = run(deployment(mock), lambda d: d.request(typed("chat", {**CHAT, "stop": "zulu", "temperature": 0.5})))
    assert body["object"] == "chat.completion" and body["model"] == UPSTREAM_MODEL
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": REPLY},
                                  "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    (received,) = mock.requests
    assert received.path == "/v1/messages"
    assert received.headers["x-api-key"] == "sk-ant" and received.headers["anthropic-version"] == "2023-06-01"
    assert received.body == {
        "model": UPSTREAM_MODEL, "max_tokens": 3, "system": "be brief\n\nno lists", "temperature": 0.5,
        "stop_sequences": ["zulu"],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"},
                                                  {"type": "text", "text": "and again"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "user", "content": [{"type": "text", "text": "three words please"}]}]}


def test_stop_sequence_and_default_max_tokens(mock):
    body = run(deployment(mock, default_max_tokens=5),
               lambda d: d.request(typed("chat", {"messages": MESSAGES[2:3], "stop": ["delta"]})))
    assert mock.requests[0].body["max_tokens"] == 5
    assert body["choices"][0]["message"]["content"] == REPLY and body["choices"][0]["finish_reason"] == "stop"


def test_stream_yields_role_content_finish_then_usage(mock):
    first, *content, finish, usage = run(deployment(mock), stream_chat)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == REPLY
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert {c["model"] for c in (first, usage)} == {UPSTREAM_MODEL}
    assert mock.requests[0].body["stream"] is True


def test_only_chat_is_served(mock):
    error, _ = fails(deployment(mock), lambda d: d.request(typed("completions", {"prompt": "x"})))
    assert error.kind is ErrorKind.INVALID_REQUEST and not mock.requests


@pytest.mark.parametrize("call", [chat, stream_chat])
def test_error_bodies_are_classified(mock, call):
    mock.inject(Fault.error(429, "rate limited", retry_after=3), Fault.error(529, "Overloaded"),
                Fault.context_length(), Fault.content_policy(), Fault.error(500))
    expected = [(ErrorKind.RATE_LIMIT, 429, None, 3.0), (ErrorKind.OVERLOADED, 503, "overloaded_error", None),
                (ErrorKind.CONTEXT_LENGTH, 400, "context_length_exceeded", None),
                (ErrorKind.CONTENT_POLICY, 400, "content_policy_violation", None),
                (ErrorKind.SERVER, 500, None, None)]
    for kind, status, code, retry_after in expected:
        error, _ = fails(deployment(mock), call)
        assert (error.kind, error.status, error.code, error.retry_after) == (kind, status, code, retry_after)


def test_missing_api_key_is_an_auth_error(mock):
    error, _ = fails(deployment(mock, api_key=None), chat)
    assert (error.kind, error.status) == (ErrorKind.AUTH, 401)


@pytest.mark.parametrize("fault, kind, code", [
    (Fault.cut(after=4), ErrorKind.CONNECTION, None),
    (Fault.malformed(after=4), ErrorKind.SERVER, "malformed_chunk"),
    (Fault.stall(after=4), ErrorKind.TIMEOUT, "stream_silence_timeout"),
    (Fault.hang(), ErrorKind.TIMEOUT, "first_token_timeout"),
    (Fault.reset(), ErrorKind.CONNECTION, None),
    (Fault.error_event(after=4), ErrorKind.OVERLOADED, "overloaded_error"),
])
def test_stream_faults(mock, fault, kind, code):
    mock.inject(fault)
    got: list = []
    error, elapsed = fails(deployment(mock), lambda d: collect(d, "chat", CHAT, got))
    assert (error.kind, error.code) == (kind, code) and elapsed < 1.5
    assert all(chunk["choices"] for chunk in got)  # never a usage chunk before the failure


def test_a_stream_without_message_stop_is_whole_once_its_stop_reason_came(mock):
    mock.inject(Fault.no_done())
    chunks = run(deployment(mock), stream_chat)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == REPLY
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_a_final_assistant_message_is_continued(mock):
    body = {**CHAT, "messages": [*MESSAGES, {"role": "assistant", "content": "alpha"}]}
    chunks = run(deployment(mock), lambda d: collect(d, "chat", body))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
        " " + " ".join(WORDS[1:4])
    assert mock.requests[-1].body["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": "alpha"}]}


def test_usage_counts_cache_reads_and_writes():
    usage = to_usage({"input_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20,
                      "output_tokens": 7})
    assert usage == {"prompt_tokens": 125, "completion_tokens": 7, "total_tokens": 132,
                     "prompt_tokens_details": {"cached_tokens": 100}}


def test_message_delta_usage_is_merged_into_the_final_chunk():
    translator = ChunkTranslator(created=1)
    translator.translate({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {
        "input_tokens": 4, "cache_read_input_tokens": 8, "output_tokens": 1}}}, "")
    finish = translator.translate({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                   "usage": {"output_tokens": 9}}, "")
    assert finish["choices"][0]["finish_reason"] == "stop"
    final = translator.translate({"type": "message_stop"}, "")
    assert final["usage"]["prompt_tokens"] == 12 and final["usage"]["completion_tokens"] == 9


def test_error_event_mid_stream():
    with pytest.raises(InferdError) as info:
        ChunkTranslator(created=1).translate(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "")
    assert info.value.kind is ErrorKind.OVERLOADED


def test_images_and_unsupported_roles():
    request = to_messages_request(typed("chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}]}).body, "c", 10)
    assert [block["source"] for block in request["messages"][0]["content"]] == [
        {"type": "base64", "media_type": "image/png", "data": "AAAA"}, {"type": "url", "url": "https://x/cat.png"}]
    with pytest.raises(InferdError) as info:
        to_messages_request(typed("chat", {"messages": [{"role": "tool", "content": "42"}]}).body, "c", 10)
    # a tool result is translated, but must name the call it answers
    assert info.value.kind is ErrorKind.INVALID_REQUEST and info.value.param == "messages[0].tool_call_id"
    with pytest.raises(InferdError, match="n must be 1"):
        to_messages_request(typed("chat", {"n": 2, "messages": [{"role": "user", "content": "hi"}]}).body, "c", 10)


@pytest.mark.parametrize("extra,param", [({"response_format": {"type": "json_schema", "json_schema": {
                                             "name": "x", "schema": {"type": "array"}}}}, "response_format"),
                                         ({"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
                                         ({"logit_bias": {"5": 1}}, "logit_bias")])
def test_what_has_no_translation_is_refused_not_dropped(extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(InferdError) as info:
        to_messages_request(typed("chat", body).body, "c", 10)
    assert info.value.status == 400 and info.value.param == param


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_tools_and_a_tool_loop_translate_to_the_messages_api():
    body = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"}],
        "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    request = to_messages_request(typed("chat", body).body, "c", 100)
    assert request["tools"] == [{"name": "get_weather", "description": "Weather in a city.",
                                 "input_schema": WEATHER["function"]["parameters"]}]
    assert request["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert request["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]}
    assert request["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "21 C, sunny"}]}
    named = {**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    assert to_messages_request(typed("chat", named).body, "c", 100)["tool_choice"]["type"] == "tool"
    none = {**body, "tool_choice": "none"}
    assert to_messages_request(typed("chat", none).body, "c", 100)["tool_choice"] == {"type": "none"}
    with pytest.raises(InferdError) as info:
        bad = {**body, "messages": [body["messages"][0], {"role": "tool", "content": "x"}]}
        to_messages_request(typed("chat", bad).body, "c", 100)
    assert info.value.param == "messages[1].tool_call_id"


def test_tool_use_answers_come_back_as_tool_calls_whole_and_streamed():
    message = {"id": "msg_1", "model": "claude", "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 7},
               "content": [{"type": "text", "text": "Let me look."},
                           {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]}
    whole = to_chat_completion(message, created=1)["choices"][0]
    assert whole["finish_reason"] == "tool_calls"
    assert whole["message"]["tool_calls"] == [{"id": "toolu_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    t = ChunkTranslator(created=1)
    events = [{"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 5}}},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me look."}},
              {"type": "content_block_start", "index": 1,
               "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}},
              {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}},
              {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'ty": "Oslo"}'}},
              {"type": "content_block_stop", "index": 1},
              {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}}]
    chunks = [c for c in (t.translate(e, "") for e in events) if c is not None]
    pieces = [p for c in chunks for ch in c["choices"] for p in ch["delta"].get("tool_calls", ())]
    assert pieces[0] == {"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(p["function"]["arguments"] for p in pieces) == '{"city": "Oslo"}'
    assert json.loads("".join(p["function"]["arguments"] for p in pieces)) == {"city": "Oslo"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_json_output_is_a_forced_tool_whose_input_is_the_answer():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {"messages": [{"role": "user", "content": "A city?"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}
    request = to_messages_request(typed("chat", body).body, "c", 100)
    assert request["tools"] == [{"name": "json_answer", "description": "Give the answer as this JSON object.",
                                 "input_schema": schema}]
    assert request["tool_choice"] == {"type": "tool", "name": "json_answer"}
    message = {"id": "m", "model": "claude", "stop_reason": "tool_use", "usage": {},
               "content": [{"type": "tool_use", "id": "toolu_1", "name": "json_answer", "input": {"city": "Lyon"}}]}
    choice = to_chat_completion(message, created=1, json_answer=True)["choices"][0]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": '{"city": "Lyon"}'},
                      "finish_reason": "stop"}
    t = ChunkTranslator(created=1, json_answer=True)
    events = [{"type": "content_block_start", "index": 0,
               "content_block": {"type": "tool_use", "id": "toolu_1", "name": "json_answer", "input": {}}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"city"'}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ': "Lyon"}'}},
              {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 4}}]
    chunks = [c for c in (t.translate(e, "") for e in events) if c is not None]
    assert "".join(ch["delta"].get("content", "") for c in chunks for ch in c["choices"]) == '{"city": "Lyon"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any("tool_calls" in ch["delta"] for c in chunks for ch in c["choices"])
