"""SSE framing: every event is one line for any line reader, whatever the model wrote."""

from __future__ import annotations

import json

from httpx._decoders import LineDecoder

from inferd.api.protocol import sse


def test_unicode_line_separators_do_not_split_an_event():
    # U+0085, U+2028 and U+2029 are line breaks to str.splitlines() (and so to httpx's
    # iter_lines), not to SSE; a model can emit any of them
    text = "a\u2028b\x85c\u2029d — ü 🙂\ttab"
    event = sse({"choices": [{"text": text}]})
    lines = [line for line in LineDecoder().decode(event.decode()) if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: "):]) == {"choices": [{"text": text}]}
    assert event.decode().splitlines()[0] == lines[0]
