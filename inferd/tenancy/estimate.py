"""The most tokens a request could use, before it runs: what rate limits and budgets reserve.

The prompt bound is the UTF-8 byte count of its text (a byte-level BPE token
covers at least one byte), plus, for chat, a few tokens per message for the
template's role markers and an allowance for the default system prompt some
templates add, and for each image part the most tokens an image can become; prompts given as token ids count exactly. The output bound is
`max_tokens` (or `max_completion_tokens`) times `n`, or, when the client set no
limit, the group's default: its local engine's context length, else 4096.
"""

from __future__ import annotations

import json

from inferd.wire.request import InferenceRequest
from inferd.wire.schema import ContentPart

DEFAULT_MAX_OUTPUT = 4096
_PER_MESSAGE = 8        # role markers and separators a chat template adds
_TEMPLATE_ALLOWANCE = 64  # a default system prompt (SmolLM2's is ~30 tokens) and generation prompt
# an image's tokens at most: Idefics3's largest split at its default sizes, 4 x 4 tiles and the global
# image of 169 tokens each with their tags (SmolVLM's 64-token tiles stay well under it)
_PER_IMAGE = 17 * (169 + 3)


def _text_bytes(value: str | list | None) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if not value:
        return 0
    if isinstance(value[0], int):  # token ids count exactly
        return len(value)
    if isinstance(value[0], ContentPart):
        return sum(_text_bytes(part.text) + (_PER_IMAGE if part.type == "image_url" else 0) for part in value)
    return sum(_text_bytes(v) for v in value)  # several prompts or inputs


def prompt_bound(request: InferenceRequest) -> int:
    body = request.body
    if request.endpoint == "chat":
        tokens = _TEMPLATE_ALLOWANCE + sum(_text_bytes(m.content) + _PER_MESSAGE for m in body.messages)
        if body.tools:
            tokens += len(json.dumps([tool.model_dump(exclude_none=True) for tool in body.tools]).encode())
        return tokens
    if request.endpoint == "completions":
        return _text_bytes(body.prompt)
    return _text_bytes(body.input)


def _num_prompts(prompt: str | list) -> int:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def output_bound(request: InferenceRequest, default_max_output: int = DEFAULT_MAX_OUTPUT) -> int:
    body = request.body
    if request.endpoint == "embeddings":
        return 0
    limit = body.output_limit  # the engine's precedence and meaning
    if limit is None:
        limit = default_max_output
    count = _num_prompts(body.prompt) if request.endpoint == "completions" else 1
    return max(0, limit) * body.n * count
