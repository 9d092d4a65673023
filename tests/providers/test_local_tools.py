"""Tool calls out of model text: whole and streamed parses agree for every chunking (property tests)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from inferd.providers.local_tools import CLOSE, OPEN, CallStream, merged, message

ARGS = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)


@st.composite
def answers(draw) -> str:
    """Text, calls (well-formed, cut short or malformed), text that looks like a tag, in any order."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["text", "call", "tagtext", "blank"]))
        if kind == "text":
            parts.append(draw(st.text(alphabet="ab <>{}\"\\\n", max_size=12)))
        elif kind == "blank":
            parts.append(draw(st.sampled_from(["\n", " ", "\n\n"])))
        elif kind == "tagtext":
            parts.append(draw(st.sampled_from(["<tool", "<tool_call", OPEN + " not json " + CLOSE, "</tool_call>"])))
        else:
            call = json.dumps({"name": draw(st.sampled_from(["f", "get_weather"])), "arguments": draw(ARGS)})
            parts.append(f"{OPEN}\n{call}\n{CLOSE}")
    if draw(st.booleans()):  # an answer cut inside a call
        call = json.dumps({"name": "f", "arguments": draw(ARGS)})
        parts.append(f"{OPEN}\n{call[:draw(st.integers(0, len(call)))]}")
    return "".join(parts)


def _stream(text: str, cuts: list[int]) -> tuple[str | None, list[tuple[str, str]], list[dict]]:
    stream, deltas, pos = CallStream(), [], 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(text))) + [len(text)]:
        deltas.append(merged(stream.feed(text[pos:cut])))
        pos = cut
    deltas.append(merged(stream.feed("", final=True)))
    content = "".join(d.get("content", "") for d in deltas) or None
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for piece in d.get("tool_calls", ()):
            name_args = calls.setdefault(piece["index"], ["", ""])
            name_args[0] += piece["function"].get("name", "")
            name_args[1] += piece["function"].get("arguments", "")
    return content, [tuple(v) for _, v in sorted(calls.items())], deltas


@settings(max_examples=300, deadline=None)
@given(answers(), st.lists(st.integers(0, 200), max_size=30))
def test_streamed_deltas_concatenate_to_the_whole_message(text, cuts):
    whole, _ = message(text)
    content, calls, deltas = _stream(text, cuts)
    assert content == whole["content"]
    assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in whole.get("tool_calls", [])]
    ids = [p["id"] for d in deltas for p in d.get("tool_calls", ()) if "id" in p]
    assert len(ids) == len(set(ids)) == len(calls)  # each call's id comes once


def test_a_call_is_read_and_its_arguments_kept_as_written():
    text = f'Let me check.\n{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris", "n": [1, "}}"]}}}}\n{CLOSE}'
    msg, called = message(text)
    assert called and msg["content"] == "Let me check.\n"
    [call] = msg["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "n": [1, "}"]}'}
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "n": [1, "}"]}


def test_text_that_only_looks_like_a_call_stays_content():
    for text in [f"I use {OPEN} tags", f"{OPEN} not json {CLOSE}", "a < b"]:
        msg, called = message(text)
        assert not called and msg["content"] == text
