"""Thinking apart from the answer: whole and streamed splits agree for every chunking (property test)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from inferd.providers.local_reasoning import END, START, ReasoningStream, prompt_state, split, still_thinking

PIECES = st.sampled_from(["a", " b", "\n", "<", "</", "</thi", END, START, "<think", "x>y", "\n\n"])


@settings(max_examples=500, deadline=None)
@given(st.lists(PIECES, max_size=12).map("".join), st.sampled_from(["thinking", "free", "answering"]),
       st.lists(st.integers(0, 60), max_size=12))
def test_streamed_reasoning_and_content_concatenate_to_the_whole_split(text, state, cuts):
    stream, reasoning, content, pos = ReasoningStream(state), "", "", 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(text))) + [len(text)]:
        r, c = stream.feed(text[pos:cut])
        reasoning, content, pos = reasoning + r, content + c, cut
    r, c = stream.feed("", final=True)
    assert (reasoning + r or None, content + c or None) == split(text, state)


def test_the_prompt_says_where_the_model_starts():
    assert prompt_state("<|im_start|>assistant\n<think>\n") == "thinking"
    assert prompt_state("<|im_start|>assistant\n<think>\n\n</think>\n\n") == "answering"
    assert prompt_state("<|im_start|>assistant\n") == "free"
    assert split("I think so</think>\n\nYes.", "thinking") == ("I think so", "Yes.")
    assert split("<think>hmm</think>ok", "free") == ("hmm", "ok") and split("plain", "free") == (None, "plain")
    assert still_thinking("still going", "thinking") and not still_thinking("done</think>a", "thinking")
