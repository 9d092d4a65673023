"""vLLM's tokenizer endpoints: `/tokenize`, `/detokenize`, `/tokenizer_info`.

Clients that count tokens themselves use them instead of loading a tokenizer of
their own: lm-eval's `local-completions` with `tokenizer_backend=remote` (or
`auto`) needs nothing else, which matters for GGUF models that have no hub id.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import Field

from inferd.api.protocol import json_response, state
from inferd.providers.local_chat import encode_messages
from inferd.wire.errors import http_error
from inferd.wire.schema import ChatMessage, WireModel

router = APIRouter()


class TokenizeRequest(WireModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(WireModel):
    model: str | None = None
    tokens: list[int] = Field(default_factory=list)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    tok, info = state(request).tokenizer(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise http_error(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
    if body.prompt is not None:
        ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        ids = encode_messages(tok, body.messages, body.add_generation_prompt)
    return json_response({"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids})


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    tok, info = state(request).tokenizer(body.model)
    bad = next((t for t in body.tokens if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise http_error(400, f"token id {bad} is outside the vocabulary", param="tokens")
    return json_response({"prompt": tok.decode(body.tokens, skip_special_tokens=False)})


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None):
    tok, info = state(request).tokenizer(model)
    spec = tok.spec
    return json_response({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spec.bos_token,
                          "eos_token": spec.eos_token, "pad_token": spec.pad_token,
                          "add_bos_token": spec.add_bos_token, "chat_template": spec.chat_template,
                          "model_max_length": info.max_model_len})
