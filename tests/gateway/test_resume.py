"""The pieces of mid-stream failover: what the client has, the continuation request, the prefix filter."""

from __future__ import annotations

import pytest

from inferd.gateway.resume import Mismatch, PrefixFilter, Progress, blocker, continuation
from tests.typed import typed

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}


def chunk(content=None, finish=None, index=0, **delta) -> dict:
    if content is not None:
        delta["content"] = content
    return {"choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def test_progress_follows_the_text_and_what_blocks_a_continuation():
    p = Progress("chat")
    for c in (chunk("", role="assistant"), chunk("Hel"), chunk("lo ")):
        p.observe(c)
    assert (p.text, p.tokens, p.blocker, p.finished) == ("Hello ", 2, None, False)
    p.observe(chunk(tool_calls=[{"index": 0}]))
    assert p.blocker is not None
    q = Progress("chat")
    q.observe(chunk("x", index=1))
    assert q.blocker == "more than one choice"
    r = Progress("completions")
    r.observe({"choices": [{"index": 0, "text": "ab", "finish_reason": "stop"}]})
    assert (r.text, r.finished) == ("ab", True)


def test_requests_that_cannot_be_continued():
    assert blocker(typed("chat", {**CHAT, "n": 2})) == "n > 1"
    assert blocker(typed("completions", {"model": "m", "prompt": [1, 2], "stream": True})) is not None
    assert blocker(typed("completions", {"model": "m", "prompt": "a", "echo": True, "stream": True})) is not None
    assert blocker(typed("chat", CHAT)) is None


def test_a_chat_continuation_prefills_the_answer_without_its_trailing_space_and_keeps_the_budget():
    p = Progress("chat", text="The answer is ", tokens=4)
    cont = continuation(typed("chat", CHAT), p, prefill=True)
    body = cont.request.body
    assert body.messages[-1].role == "assistant" and body.messages[-1].content == "The answer is"
    assert body.continue_final_message and not body.add_generation_prompt and body.max_tokens == 6
    assert (cont.expected, cont.strict) == (" ", False)
    assert cont.request.request_id == "test-request"


def test_without_prefill_the_same_request_is_asked_and_must_repeat_the_text():
    req = typed("chat", CHAT)
    cont = continuation(req, Progress("chat", text="The answer", tokens=2), prefill=False)
    assert cont.request is req and (cont.expected, cont.strict) == ("The answer", True)


def test_a_completion_continues_its_prompt():
    req = typed("completions", {"model": "m", "prompt": "Once", "max_tokens": 5, "stream": True})
    cont = continuation(req, Progress("completions", text=" upon a", tokens=2), prefill=False)
    assert cont.request.body.prompt == "Once upon a" and cont.request.body.max_tokens == 3 and cont.expected == ""


def test_the_prefix_filter_holds_back_until_the_repeated_text_is_covered():
    f = PrefixFilter("Hello wor", strict=True)
    assert [f.take(p) for p in ("Hel", "lo", " world", "!")] == ["", "", "ld", "!"]
    f.finish()
    g = PrefixFilter("Hello", strict=True)
    with pytest.raises(Mismatch):
        g.take("Help")
    h = PrefixFilter("Hello", strict=True)
    h.take("Hell")
    with pytest.raises(Mismatch):  # the regenerated answer ended before it covered the sent text
        h.finish()


def test_a_whitespace_prefix_is_dropped_only_when_it_comes():
    assert PrefixFilter(" ", strict=False).take(" world") == "world"
    assert PrefixFilter(" ", strict=False).take("world") == "world"
    assert PrefixFilter("\n", strict=False).take("  x") == " x"
