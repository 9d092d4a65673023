"""Structured output: what a request's output must match, as an llguidance grammar.

A request names its constraint in the OpenAI or vLLM way (wire/schema.py reads
`response_format`, `structured_outputs` and vLLM's older `guided_*` fields); this
module turns each kind into one llguidance grammar string, the only form that
crosses to the engine core (in `SamplingParams.grammar`):
- `json`: a JSON schema, enforced as written: a keyword the compiler cannot
  enforce (`uniqueItems`, `not`, `if`/`then`, ...) is refused, never dropped;
- `json_object`: any JSON object;
- `regex`, `choice` (one of a list of strings), `grammar` (Lark, or GBNF as
  llama.cpp writes it, converted).

`check` compiles the grammar with the same limits the core uses (lexer fuel,
grammar size, Earley items per row), so a grammar that is too large or invalid
is refused with the compiler's reason before the request is accepted; callers
run it off their event loop and bound its time (`CHECK_TIMEOUT_S`). The core
compiles grammars again for its matchers (engine/core/guidance.py), off its step
loop, with a cache.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from inferd.engine.sampling_params import InvalidParameterError

CHECK_TIMEOUT_S = 10.0      # the longest a grammar may take to compile at the edge
MAX_GRAMMAR_BYTES = 1 << 20  # a schema or grammar text above this is refused before compiling
KINDS = ("json", "json_object", "regex", "choice", "grammar")
# JSON as models were trained to write it (and OpenAI answers): one space after ',' and ':',
# no other whitespace, so a small model cannot spend its tokens on blank lines
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def limits():
    """The compiler's limits, the same at the edge and in the core."""
    from llguidance import LLParserLimits

    return LLParserLimits(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                          max_lexer_states=250_000, max_grammar_size=500_000)


def grammar_for(kind: str, spec: Any, param: str) -> str:
    """The llguidance grammar for a constraint of `kind`; InvalidParameterError(param) if `spec` is malformed."""
    from llguidance import LLMatcher, gbnf_to_lark

    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_STYLE)
    if kind == "json":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise InvalidParameterError(param, f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(spec, (dict, bool)):
            raise InvalidParameterError(param, "the JSON schema must be an object")
        _check_size(json.dumps(spec), param)
        return LLMatcher.grammar_from_json_schema(spec, defaults=JSON_STYLE)
    if kind == "regex":
        if not isinstance(spec, str) or not spec:
            raise InvalidParameterError(param, "the regex must be a non-empty string")
        _check_size(spec, param)
        return LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
            raise InvalidParameterError(param, "choice must be a non-empty list of non-empty strings")
        _check_size("".join(spec), param)
        return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in spec))
    if kind == "grammar":
        if not isinstance(spec, str) or not spec.strip():
            raise InvalidParameterError(param, "the grammar must be a non-empty string")
        _check_size(spec, param)
        if "::=" in spec:  # GBNF (llama.cpp's form); Lark uses ':'
            try:
                spec = gbnf_to_lark(spec)
            except Exception as e:  # noqa: BLE001 - the converter's own message says what is wrong
                raise InvalidParameterError(param, f"the GBNF grammar could not be read: {e}") from None
        return LLMatcher.grammar_from_lark(spec)
    raise InvalidParameterError(param, f"unknown constraint {kind!r}; allowed: {', '.join(KINDS)}")


def lark_rule(name: str, kind: str, spec: Any, param: str) -> str:
    """Lark rules (llguidance's dialect) defining rule `name` as the constraint, to compose into a larger
    grammar (an answer after a model's thinking); a Lark grammar of the client's own cannot be composed."""
    if kind == "json_object":
        spec = {"type": "object"}
    if kind in ("json", "json_object"):
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise InvalidParameterError(param, f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(spec, dict):
            raise InvalidParameterError(param, "the JSON schema must be an object")
        styled = {**spec, "x-guidance": {**JSON_STYLE, **spec.get("x-guidance", {})}}
        return f"{name}: %json {json.dumps(styled)}\n"
    if kind == "regex":
        grammar_for(kind, spec, param)  # the same checks of its shape
        return f"{name}: {name.upper()}_RE\n{name.upper()}_RE: /{spec.replace('/', chr(92) + '/')}/\n"
    if kind == "choice":
        grammar_for(kind, spec, param)
        return f"{name}: " + " | ".join(json.dumps(c) for c in spec) + "\n"
    raise InvalidParameterError(param, "a Lark or GBNF grammar cannot follow a model's reasoning; use json, "
                                "regex or choice, or turn reasoning off")


def _check_size(text: str, param: str) -> None:
    if len(text.encode()) > MAX_GRAMMAR_BYTES:
        raise InvalidParameterError(param, f"is larger than {MAX_GRAMMAR_BYTES} bytes")


@functools.lru_cache(maxsize=256)
def compile_error(grammar: str) -> str:
    """The compiler's complaint about `grammar` ('' when it compiles within the limits)."""
    from llguidance import LLMatcher

    return LLMatcher.validate_grammar(grammar, None, limits=limits())


def check(grammar: str, param: str) -> None:
    """Raise InvalidParameterError(param) with the compiler's reason if `grammar` does not compile."""
    error = compile_error(grammar)
    if error:
        raise InvalidParameterError(param, f"cannot be enforced: {error.strip()}")
