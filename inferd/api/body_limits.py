"""What a JSON request body may be, checked before anything reads its fields.

Every JSON route reads its body through `read_json` (api/protocol.py), which
applies these limits, so hostile or careless input gets a clear 4xx and never
reaches a handler, the tokenizer or the ledger:

- size: at most `BodyLimits.max_bytes` (`--max-request-bytes`), read in chunks and
  refused with 413 as soon as it is exceeded, whatever Content-Length says;
- type: a Content-Type, when sent, must be JSON (`application/json` or `+json`),
  so a cross-site form or `text/plain` POST from a web page is refused (415);
- shape: nesting at most `max_depth` deep and no lone UTF-16 surrogate in any
  string or key, the rules batch input lines follow too (wire/json_shape.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import msgspec

from inferd.wire.errors import http_error
from inferd.wire.json_shape import MAX_JSON_DEPTH, shape_problem, too_deep

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_depth: int = MAX_JSON_DEPTH

    def __post_init__(self):
        if self.max_bytes < 1024:
            raise ValueError(f"max_request_bytes: must be at least 1024, got {self.max_bytes}")


def check_content_type(value: str | None) -> None:
    if not value:
        return  # curl -d without -H and some SDKs send none; browsers always send one
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise http_error(415, f"the request body must be JSON (Content-Type: application/json), not {media!r}",
                       code="unsupported_media_type")


def decode(raw: bytes, max_depth: int):
    """The JSON value in `raw`: msgspec first (fast), json for what msgspec refuses but clients send
    (NaN, Infinity, lone surrogates, which `check_shape` then names); 400 if neither can read it."""
    try:
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as e:
            try:
                return json.loads(raw)
            except ValueError:
                raise http_error(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise http_error(400, f"the request body is {too_deep(max_depth)}") from None


async def read_limited(stream, max_bytes: int) -> bytes:
    """The body from an ASGI byte stream, or 413 once it passes `max_bytes`."""
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > max_bytes:
            raise http_error(413, f"the request body is larger than {max_bytes} bytes, this server's limit "
                           "(--max-request-bytes)", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def check_shape(body: object, max_depth: int) -> None:
    """400 for nesting deeper than `max_depth` or a string that is not valid text."""
    problem = shape_problem(body, max_depth)
    if problem:
        raise http_error(400, f"the request body {problem}")
