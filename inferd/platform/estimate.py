"""The most tokens a request could use, before it runs: what rate limits and budgets reserve.

The prompt bound is the UTF-8 byte count of its text (a byte-level BPE token
covers at least one byte), plus, for chat, a few tokens per message for the
template's role markers and an allowance for the default system prompt some
templates add; prompts given as token ids count exactly. The output bound is
`max_tokens` (or `max_completion_tokens`) times `n`, or, when the client set no
limit, the group's default: its local engine's context length, else 4096.
"""

from __future__ import annotations

import json
from typing import Any

from inferd.providers.openai_schema import output_limit

DEFAULT_MAX_OUTPUT = 4096
_PER_MESSAGE = 8        # role markers and separators a chat template adds
_TEMPLATE_ALLOWANCE = 64  # a default system prompt (SmolLM2's is ~30 tokens) and generation prompt


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):  # content parts, or token ids
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_text_bytes(v.get("text", "") if isinstance(v, dict) else v) for v in value)
    return 0


def prompt_bound(endpoint: str, body: dict) -> int:
    if endpoint == "chat":
        messages = body.get("messages") or []
        tokens = _TEMPLATE_ALLOWANCE + sum(_text_bytes(m.get("content")) + _PER_MESSAGE
                                           for m in messages if isinstance(m, dict))
        if body.get("tools"):
            tokens += len(json.dumps(body["tools"]).encode())
        return tokens
    if endpoint == "completions":
        return _text_bytes(body.get("prompt"))
    if endpoint == "infer":
        return 0  # tensors, not text: priced per prediction
    return _text_bytes(body.get("input"))


def _num_prompts(body: dict) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        return len(prompt)
    return 1


def output_bound(endpoint: str, body: dict, default_max_output: int = DEFAULT_MAX_OUTPUT) -> int:
    if endpoint in ("embeddings", "infer"):  # no tokens come out of an embedding or a tensor model
        return 0
    limit = output_limit(body)  # the engine's precedence and meaning
    if limit is None:
        limit = default_max_output
    n = body.get("n") or 1
    count = _num_prompts(body) if endpoint == "completions" else 1
    return max(0, int(limit)) * max(1, int(n)) * count
