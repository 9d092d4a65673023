"""The shared HTTP pieces: the event-stream parser and the Retry-After reader."""

from __future__ import annotations

import email.utils
import time

import pytest

from inferd.providers.http import SSEEvent, SSEParser, parse_chunk, parse_retry_after
from inferd.wire.errors import ErrorKind, InferdError


def parse(*pieces: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    events = [event for piece in pieces for event in parser.feed(piece)]
    return events + parser.close()


def test_events_split_anywhere_and_any_line_end():
    stream = b'\xef\xbb\xbfdata: {"a": 1}\r\n\r\n: keep-alive\n\nevent: ping\ndata: {}\r\rdata: x\n\n'
    expected = [SSEEvent("message", '{"a": 1}'), SSEEvent("ping", "{}"), SSEEvent("message", "x")]
    assert parse(stream) == expected
    assert parse(*(stream[i:i + 1] for i in range(len(stream)))) == expected  # one byte at a time


def test_multi_line_data_and_fields():
    assert parse(b"data:first\ndata: second\nid: 7\nretry: 10\nunknown\n\n") == [
        SSEEvent("message", "first\nsecond")]


def test_unicode_line_separators_stay_inside_the_event():
    data = '{"text": "a\u2028b\u0085c"}'
    assert parse(f"data: {data}\n\n".encode()) == [SSEEvent("message", data)]


def test_an_event_left_open_at_the_end_is_delivered():
    assert parse(b"data: [DONE]") == [SSEEvent("message", "[DONE]")]
    assert parse(b"data: [DONE]\n") == [SSEEvent("message", "[DONE]")]


def test_parse_chunk_rejects_what_is_not_an_object():
    assert parse_chunk("d", '{"a": 1}') == {"a": 1}
    for data in ('{"a": ', "[1]", "[DONE"):
        with pytest.raises(InferdError) as info:
            parse_chunk("d", data)
        assert info.value.kind is ErrorKind.SERVER and info.value.code == "malformed_chunk"


def test_retry_after_forms():
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "7"}) == 0.25
    assert parse_retry_after({"retry-after": "-3"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    date = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= parse_retry_after({"retry-after": date}) <= 60
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert parse_retry_after({"retry-after": past}) == 0.0
