"""What decoded JSON must be before anything stores or tokenizes it, wherever it came from.

Request bodies (api/body_limits.py) and batch input lines (batch/files.py) are
checked by the same rules; the ledger uses `is_text` for the rows it writes:

- nesting at most `MAX_JSON_DEPTH` deep (the decoders and every walk recurse);
- no lone UTF-16 surrogate in any string or key: `\\ud800` is valid JSON escaping
  but no text, so it cannot be encoded, tokenized or stored.
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_DEPTH = 64


class JSONShapeError(ValueError):
    """Valid JSON that breaks a rule here (too deep, not text)."""


def is_text(s: str) -> bool:
    """`s` is valid Unicode (encodes as UTF-8): no lone surrogates."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def too_deep(max_depth: int) -> str:
    return f"nested more than {max_depth} levels deep"


LONE_SURROGATE = "contains a lone UTF-16 surrogate (such as \\ud800) in a string; send valid Unicode text"


def shape_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """What is wrong with decoded JSON `value` (too deep, not text), or None."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not is_text(item):
                return LONE_SURROGATE
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                return too_deep(max_depth)
            if isinstance(item, dict):
                for key, child in item.items():
                    if not is_text(key):
                        return LONE_SURROGATE
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
    return None


def loads_checked(raw: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` (NaN and Infinity accepted) with the checks above: ValueError if it is not JSON,
    JSONShapeError if it breaks a rule."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise JSONShapeError(too_deep(max_depth)) from None
    problem = shape_problem(value, max_depth)
    if problem:
        raise JSONShapeError(problem)
    return value
