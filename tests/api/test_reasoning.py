"""Reasoning output: thinking in `reasoning_content`, the answer in `content`, constraints on the answer.

A tiny random model with a template that opens `<think>` (as Qwen3's does) never
closes its thinking on its own, so the thinking budget scripts every path: after
`max_reasoning_tokens` the end tag is written and the answer follows, under the
request's constraint or tool grammar.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api.conftest import MODEL, ServerProc
from tests.tiny_models import THINKING_TEMPLATE, build_tiny_model

ASK = [{"role": "user", "content": "Is the sky blue?"}]
CHOICE = {"structured_outputs": {"choice": ["yes", "no"]}}


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-thinker"), "llama", chat_template=THINKING_TEMPLATE)
    srv = ServerProc(model).wait_ready()
    yield srv
    srv.stop()


def _chat(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", headers=server.headers, timeout=60,
                      json={"model": MODEL, "messages": ASK, "temperature": 0, **body})


def _streamed(server, **body) -> tuple[str, str, dict, str | None]:
    reasoning = content = ""
    usage, finish = {}, None
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=server.headers, timeout=60,
                      json={"model": MODEL, "messages": ASK, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}, **body}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                reasoning += choice["delta"].get("reasoning_content") or ""
                content += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    return reasoning, content, usage, finish


def test_a_spent_budget_closes_the_thinking_and_the_answer_follows_its_constraint(thinker):
    r = _chat(thinker, max_reasoning_tokens=6, max_tokens=40, **CHOICE)
    assert r.status_code == 200, r.text
    body = r.json()
    message, usage = body["choices"][0]["message"], body["usage"]
    assert message["content"] in ("yes", "no") and body["choices"][0]["finish_reason"] == "stop"
    assert message["reasoning_content"] and "</think>" not in message["reasoning_content"]
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]


def test_streamed_reasoning_and_content_add_up_to_the_whole_answer(thinker):
    whole = _chat(thinker, max_reasoning_tokens=6, max_tokens=40, **CHOICE).json()
    reasoning, content, usage, finish = _streamed(thinker, max_reasoning_tokens=6, max_tokens=40, **CHOICE)
    message = whole["choices"][0]["message"]
    assert (reasoning, content, finish) == (message["reasoning_content"], message["content"], "stop")
    assert usage["completion_tokens_details"] == whole["usage"]["completion_tokens_details"]


def test_tool_calls_come_after_the_thinking(thinker):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}, "required": ["q"],
        "additionalProperties": False}}}
    r = _chat(thinker, max_reasoning_tokens=4, max_tokens=130, tools=[tool], tool_choice="required",
              parallel_tool_calls=False)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "lookup" and set(json.loads(call["function"]["arguments"])) == {"q"}
    assert choice["message"]["reasoning_content"]


def test_an_answer_cut_inside_its_thinking_has_no_content(thinker):
    choice = _chat(thinker, max_tokens=8).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] is None and choice["message"]["reasoning_content"]


def test_thinking_turned_off_by_the_template_and_reasoning_left_out(thinker):
    off = _chat(thinker, max_tokens=10, chat_template_kwargs={"enable_thinking": False}, **CHOICE).json()
    message = off["choices"][0]["message"]
    assert message["content"] in ("yes", "no") and "reasoning_content" not in message
    hidden = _chat(thinker, max_reasoning_tokens=3, max_tokens=30, include_reasoning=False, **CHOICE).json()
    assert "reasoning_content" not in hidden["choices"][0]["message"]
    assert hidden["choices"][0]["message"]["content"] in ("yes", "no")


def test_reasoning_effort_maps_to_a_budget_and_a_budget_needs_one_choice(thinker):
    r = _chat(thinker, reasoning_effort="minimal", max_tokens=20, **CHOICE)
    assert r.json()["choices"][0]["message"]["content"] in ("yes", "no")
    bad = _chat(thinker, max_reasoning_tokens=3, n=2)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_reasoning_tokens"


def test_a_model_that_does_not_reason_refuses_a_thinking_budget(server):
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, timeout=60,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 3, "reasoning_effort": "low"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"


def test_the_ledger_counts_reasoning_tokens(thinker):
    import sqlite3

    from tests.api.conftest import wait_for

    rid = "thinking-ledger-1"
    r = httpx.post(thinker.url + "/v1/chat/completions", timeout=60, headers={**thinker.headers, "X-Request-Id": rid},
                   json={"model": MODEL, "messages": ASK, "temperature": 0, "max_reasoning_tokens": 5,
                         "max_tokens": 30, **CHOICE})
    expected = r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"]

    def row():
        with sqlite3.connect(thinker.store_path) as db:
            return db.execute("SELECT reasoning_tokens, completion_tokens FROM ledger WHERE request_id = ?",
                              (rid,)).fetchone()

    reasoning, completion = wait_for(row)
    assert reasoning == expected and 0 < reasoning < completion


def test_reasoning_parser_none_and_a_chat_template_of_ones_own(tmp_path_factory, tiny_llama):
    """`--reasoning-parser none` turns the split off; `--chat-template` replaces the model's template."""
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-thinker-off"), "llama", chat_template=THINKING_TEMPLATE)
    srv = ServerProc(model, "--reasoning-parser", "none").wait_ready()
    try:
        choice = _chat(srv, max_tokens=6).json()["choices"][0]
        assert "reasoning_content" not in choice["message"] and choice["message"]["content"]
    finally:
        srv.stop()
    template = tmp_path_factory.mktemp("template") / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    srv = ServerProc(tiny_llama, "--chat-template", str(template)).wait_ready()
    try:
        r = httpx.post(srv.url + "/tokenize", headers=srv.headers,
                       json={"model": MODEL, "messages": ASK, "add_special_tokens": False})
        ids = r.json()["tokens"]
        text = httpx.post(srv.url + "/detokenize", headers=srv.headers, json={"model": MODEL, "tokens": ids}).json()
        assert text["prompt"] == "[user] Is the sky blue?\n[assistant] "
    finally:
        srv.stop()


def test_a_budget_cannot_be_combined_with_logprobs(thinker):
    r = _chat(thinker, max_reasoning_tokens=3, logprobs=True, max_tokens=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
