"""Deployments on the Anthropic Messages API, behind the OpenAI chat wire format.

`AnthropicDeployment` serves the chat endpoint only. It translates the OpenAI chat
request into a Messages request (`to_messages_request`): system and developer
messages become `system`, consecutive turns of one role are merged because the API
wants user and assistant to alternate, text and image content parts become content
blocks, `max_tokens` defaults to `AnthropicConfig.default_max_tokens` since the API
requires it, `stop` becomes `stop_sequences`. Answers come back as `chat.completion`
bodies (`to_chat_completion`) and stream events as `chat.completion.chunk` bodies
(`ChunkTranslator`), ending with a usage chunk built from `message_start` and
`message_delta`. Prompt tokens count cache reads and cache writes, and cache reads
are reported as `prompt_tokens_details.cached_tokens`, as OpenAI does.

Errors: the API's `{"type": "error", "error": {"type", "message"}}` bodies, as
responses or as `error` events mid-stream, map through `classify_status`;
`overloaded_error` (HTTP 529) is `OVERLOADED` with status 503, a prompt that is too
long is `CONTEXT_LENGTH`, output blocked by the content filter is `CONTENT_POLICY`,
with OpenAI's codes for the last two. Tools translate both ways: `tools` and
`tool_choice` (required -> any, `parallel_tool_calls: false` -> disable_parallel_tool_use),
assistant `tool_calls` -> `tool_use` blocks, `tool` messages -> `tool_result` blocks in
the user's turn; answers' `tool_use` blocks -> `message.tool_calls`, and in streams
OpenAI's tool-call deltas (id and name first, then the `input_json_delta` fragments).
JSON output (`json_object`, or a `json_schema` of an object) is asked for as a
forced tool call whose input schema is the schema, and its input comes back as the
answer's content (streamed from its `input_json_delta`). Other constraints (regex,
choice, grammars, non-object JSON), `logit_bias` and thinking budgets have no
translation here and are refused with a 400 naming the field, never dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from inferd.providers.base import Deployment
from inferd.providers.http import RemoteClient, RemoteConfig, SSEEvent, parse_chunk, require_endpoint
from inferd.wire.errors import ErrorKind, InferdError, classify_status
from inferd.wire.request import InferenceRequest
from inferd.wire.schema import ChatCompletionRequest, ContentPart, NamedToolChoice

_FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                   "refusal": "content_filter", "pause_turn": "stop"}
# the HTTP status of each error type, for errors that arrive as stream events
_ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                 "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                 "overloaded_error": 529}
_OPENAI_CODES = {ErrorKind.CONTEXT_LENGTH: "context_length_exceeded",
                 ErrorKind.CONTENT_POLICY: "content_policy_violation"}


@dataclass(frozen=True, kw_only=True)
class AnthropicConfig(RemoteConfig):
    base_url: str = "https://api.anthropic.com"  # as the Anthropic SDK names it: without /v1
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = 4096


def read_anthropic_error(status: int, payload: Any, text: str, retry_after: float | None) -> InferdError:
    error = payload.get("error") if isinstance(payload, dict) else None
    kind, message = (error.get("type"), error.get("message")) if isinstance(error, dict) else (None, None)
    message = str(message or text or f"the upstream answered HTTP {status}")
    if status == 529 or kind == "overloaded_error":
        return InferdError(ErrorKind.OVERLOADED, message, status=503, code="overloaded_error",
                             retry_after=retry_after)
    # the API words its content-filter refusal in a way classify_status does not know
    code = "content_policy_violation" if "content filtering" in message.lower() else None
    result = classify_status(status, message, code, retry_after=retry_after)
    result.code = result.code or _OPENAI_CODES.get(result.kind)
    return result


def _invalid(param: str, message: str) -> InferdError:
    return InferdError(ErrorKind.INVALID_REQUEST, f"{param}: {message}", status=400, param=param)


def _content_blocks(content: str | list[ContentPart] | None, param: str) -> list[dict]:
    if not content:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for i, part in enumerate(content):
        if part.type == "text":
            if part.text:  # the API rejects empty text blocks
                blocks.append({"type": "text", "text": part.text})
        elif part.type == "image_url":
            url = part.image_url.url if part.image_url else ""
            if url.startswith("data:"):
                media_type, _, data = url[len("data:"):].partition(";base64,")
                source = {"type": "base64", "media_type": media_type, "data": data}
            else:
                source = {"type": "url", "url": url}
            blocks.append({"type": "image", "source": source})
        else:
            raise _invalid(f"{param}[{i}].type", f"{part.type!r} parts are not supported by Anthropic deployments; "
                           "use text or image_url")
    return blocks


def to_messages_request(body: ChatCompletionRequest, model: str, default_max_tokens: int) -> dict:
    """The Messages API request for an OpenAI chat request (without `stream`)."""
    if body.n != 1:
        raise _invalid("n", "Anthropic deployments return one choice; n must be 1")
    schema = _json_answer_schema(body)
    if body.logit_bias:
        raise _invalid("logit_bias", "the Anthropic Messages API has no equivalent")
    for name in ("max_reasoning_tokens", "reasoning_effort"):
        if getattr(body, name) is not None:
            raise _invalid(name, "thinking is not translated for Anthropic deployments yet")
    system: list[str] = []
    messages: list[dict] = []
    for i, message in enumerate(body.messages):
        role, param = message.role, f"messages[{i}].content"
        if role in ("system", "developer"):
            system.extend(block["text"] for block in _content_blocks(message.content, param)
                          if block["type"] == "text")
        elif role in ("user", "assistant", "tool"):
            blocks = _content_blocks(message.content, param) if role != "tool" else [_tool_result(message, i)]
            if role == "assistant":
                blocks += [_tool_use(call, f"messages[{i}].tool_calls[{k}]")
                           for k, call in enumerate(message.tool_calls or ())]
            role = "user" if role == "tool" else role  # results go back in the user's turn
            if not blocks:
                continue
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"].extend(blocks)
            else:
                messages.append({"role": role, "content": blocks})
        else:
            raise _invalid(f"messages[{i}].role", f"{role!r} is not supported by Anthropic deployments; use "
                           "system, developer, user, assistant or tool")
    limit = body.output_limit
    request: dict[str, Any] = {"model": model, "messages": messages,
                               "max_tokens": default_max_tokens if limit is None else limit}
    if system:
        request["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p", "top_k"):
        if getattr(body, name) is not None:
            request[name] = getattr(body, name)
    if body.stop:
        request["stop_sequences"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if body.user:
        request["metadata"] = {"user_id": body.user}
    if schema is not None:  # JSON output: the API's forced tool call, its input the answer
        request["tools"] = [{"name": JSON_ANSWER, "description": "Give the answer as this JSON object.",
                             "input_schema": schema}]
        request["tool_choice"] = {"type": "tool", "name": JSON_ANSWER}
    if body.tools:  # with tool_choice none too: earlier tool_use blocks refer to them
        request["tools"] = [{"name": t.function.name, "description": t.function.description or "",
                             "input_schema": t.function.parameters or {"type": "object", "properties": {}}}
                            for t in body.tools]
        request["tool_choice"] = _tool_choice(body)
    return request


JSON_ANSWER = "json_answer"  # the tool a JSON answer is asked for as (the API has no JSON mode of its own)


def _json_answer_schema(body: ChatCompletionRequest) -> dict | None:
    """The input schema of the forced tool for a JSON constraint; a 400 for constraints the API cannot take."""
    constraint = body.output_constraint()
    if constraint is None:
        return None
    kind, spec, param = constraint
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json" and isinstance(spec, dict) and spec.get("type", "object") == "object":
        return spec
    raise _invalid(param, "Anthropic deployments take JSON objects only (json_object, or a json_schema whose "
                   "type is object); use a local or OpenAI-compatible deployment for regex, choice, grammars "
                   "or other JSON")


def _tool_choice(body: ChatCompletionRequest) -> dict:
    choice = body.tool_choice
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, NamedToolChoice):
        out = {"type": "tool", "name": choice.function.name}
    else:
        out = {"type": "any" if choice == "required" else "auto"}
    if not body.parallel_tool_calls:
        out["disable_parallel_tool_use"] = True
    return out


def _tool_use(call, param: str) -> dict:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except ValueError:
        raise _invalid(param, "function.arguments must be a JSON object") from None
    if not isinstance(arguments, dict):
        raise _invalid(param, "function.arguments must be a JSON object")
    return {"type": "tool_use", "id": call.id or "toolu_" + uuid.uuid4().hex[:24], "name": call.function.name,
            "input": arguments}


def _tool_result(message, i: int) -> dict:
    if not message.tool_call_id:
        raise _invalid(f"messages[{i}].tool_call_id", "a tool message must name the call it answers")
    text = "".join(b["text"] for b in _content_blocks(message.content, f"messages[{i}].content")
                   if b["type"] == "text")
    return {"type": "tool_result", "tool_use_id": message.tool_call_id, "content": text}


def to_usage(usage: dict) -> dict:
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + cached + (usage.get("cache_creation_input_tokens") or 0)
    completion = usage.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def to_chat_completion(message: dict, created: int, json_answer: bool = False) -> dict:
    """The chat completion for a Messages answer; `json_answer`: the request asked for JSON, which came as
    the forced tool's input and is the answer's content."""
    blocks = message.get("content") or ()
    if json_answer:
        forced = next((b for b in blocks if b.get("type") == "tool_use" and b.get("name") == JSON_ANSWER), None)
        blocks = [{"type": "text", "text": json.dumps(forced.get("input") or {})}] if forced else blocks
        message = {**message, "stop_reason": "end_turn" if message.get("stop_reason") == "tool_use"
                   else message.get("stop_reason")}
    text = "".join(block.get("text", "") for block in blocks if block.get("type") == "text")
    answer: dict = {"role": "assistant", "content": text}
    calls = [{"id": b.get("id", ""), "type": "function",
              "function": {"name": b.get("name", ""), "arguments": json.dumps(b.get("input") or {})}}
             for b in blocks if b.get("type") == "tool_use"]
    if calls:
        answer = {"role": "assistant", "content": text or None, "tool_calls": calls}
    return {"id": message.get("id", ""), "object": "chat.completion", "created": created,
            "model": message.get("model", ""),
            "choices": [{"index": 0, "message": answer,
                         "finish_reason": _FINISH_REASONS.get(message.get("stop_reason"), "stop")}],
            "usage": to_usage(message.get("usage") or {})}


class ChunkTranslator:
    """Messages stream events in, `chat.completion.chunk` bodies out (None for events with nothing to say)."""

    def __init__(self, created: int, json_answer: bool = False):
        self._identity = {"id": "", "object": "chat.completion.chunk", "created": created, "model": ""}
        self._json_answer = json_answer  # the forced tool's input is the answer's content
        self._usage: dict = {}
        self._calls: dict[int, int] = {}  # the stream's block index -> the tool call's index
        self.finished = False  # a stop reason arrived: the answer is whole, with or without message_stop

    def translate(self, event: dict, data: str) -> dict | None:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self._identity.update(id=message.get("id", ""), model=message.get("model", ""))
            self._usage = dict(message.get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "input_json_delta" and self._json_answer:
                return self._chunk({"content": delta.get("partial_json", "")})
            if delta.get("type") == "input_json_delta" and event.get("index") in self._calls:
                return self._chunk({"tool_calls": [{"index": self._calls[event["index"]],
                                                    "function": {"arguments": delta.get("partial_json", "")}}]})
            return self._chunk({"content": delta["text"]}) if delta.get("type") == "text_delta" else None
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use" and self._json_answer:
                return None
            if block.get("type") == "tool_use":
                index = self._calls[event.get("index")] = len(self._calls)
                return self._chunk({"tool_calls": [{"index": index, "id": block.get("id", ""), "type": "function",
                                                    "function": {"name": block.get("name", ""), "arguments": ""}}]})
            return self._chunk({"content": block["text"]}) if block.get("type") == "text" and block.get("text") \
                else None
        if kind == "message_delta":
            # message_delta usage is cumulative and may restate input and cache counts
            self._usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            reason = (event.get("delta") or {}).get("stop_reason")
            self.finished = self.finished or reason is not None
            if reason == "tool_use" and self._json_answer:
                reason = "end_turn"
            return self._chunk({}, _FINISH_REASONS.get(reason, "stop"))
        if kind == "message_stop":
            return self.final()
        if kind == "error":
            error = event.get("error") or {}
            raise read_anthropic_error(_ERROR_STATUS.get(error.get("type"), 502), event, data, None)
        return None  # ping, content_block_stop, thinking deltas

    def final(self) -> dict:
        """The closing chunk: no choices, the usage so far."""
        return {**self._identity, "choices": [], "usage": to_usage(self._usage)}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {**self._identity, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def _is_stop(event: SSEEvent) -> bool:
    return event.event == "message_stop"


class AnthropicDeployment(Deployment):
    endpoints = frozenset({"chat"})
    takes_prefill = True  # the Messages API continues a final assistant message

    def __init__(self, config: AnthropicConfig):
        self.name, self.config = config.name, config
        headers = {"anthropic-version": config.anthropic_version}
        if config.api_key:
            headers["x-api-key"] = config.api_key
        self._http = RemoteClient(config, headers=headers, read_error=read_anthropic_error)

    def _messages_request(self, request: InferenceRequest) -> dict:
        require_endpoint(self.name, self.endpoints, request.endpoint)
        return to_messages_request(request.body, self.config.model, self.config.default_max_tokens)

    async def request(self, request: InferenceRequest) -> dict:
        message = await self._http.post_json("/v1/messages", self._messages_request(request))
        json_answer = _json_answer_schema(request.body) is not None
        return to_chat_completion(message, int(time.time()), json_answer=json_answer)

    async def stream(self, request: InferenceRequest) -> AsyncIterator[dict]:
        upstream = {**self._messages_request(request), "stream": True}
        translator = ChunkTranslator(int(time.time()), json_answer=_json_answer_schema(request.body) is not None)
        try:
            async with aclosing(self._http.post_sse("/v1/messages", upstream, is_last=_is_stop,
                                                    last_name="message_stop")) as events:
                async for event in events:
                    chunk = translator.translate(parse_chunk(self.name, event.data), event.data)
                    if chunk is not None:
                        yield chunk
        except InferdError as e:
            if e.code != "stream_truncated" or not translator.finished:
                raise
            yield translator.final()  # the stop reason and usage arrived; only message_stop is missing

    async def aclose(self) -> None:
        await self._http.aclose()
