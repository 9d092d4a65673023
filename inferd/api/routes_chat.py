"""POST /v1/chat/completions: messages through the model's chat template, then generate.

Messages (system, developer -> system, user, assistant, tool; string content or
text parts) are rendered with `Tokenizer.encode_chat`, which renders the template
the way Hugging Face does. `max_completion_tokens` wins over `max_tokens`; with
neither, generation may run to the context length. Logprobs use the chat format
(`logprobs.content[*]` with token, logprob, bytes and `top_logprobs`). A stream
sends the assistant role first, then content deltas, the finish reason in the
chunk where a choice ends, an optional usage chunk, and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import jinja2
from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse

from inferd.api.errors import APIError, api_error
from inferd.api.protocol import (SSE_DONE, SSE_HEADERS, ChatCompletionRequest, ChatMessage,
                                 cancel_on_disconnect, final_outputs, first_outputs, json_response, merge,
                                 sse, state, usage)
from inferd.engine.outputs import Logprob, PositionLogprobDict, RequestOutput
from inferd.engine.tokenizer import ChatTemplateError, Tokenizer

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    st = state(request)
    st.check_model(body.model)
    engine = st.engine
    if body.tools:
        raise APIError(400, "tools are not supported by this server", param="tools")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
    prompt_ids = encode_messages(engine.tokenizer, body.messages, body.add_generation_prompt)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = body.sampling_params(max_tokens, logprobs, body.prompt_logprobs)
    engine.check_accepting(params.n)
    streams = [engine.generate(uuid.uuid4().hex, prompt_ids, params)]
    view = _ChatView(body, len(prompt_ids), request.state.request_id, st.model_name)
    if not body.stream:
        [final] = await cancel_on_disconnect(request, final_outputs(streams))
        return json_response(view.response(final))
    firsts = await cancel_on_disconnect(request, first_outputs(streams))
    return StreamingResponse(view.stream(streams, firsts), media_type="text/event-stream",
                             headers=SSE_HEADERS)


def encode_messages(tok: Tokenizer, chat: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    """Render chat messages with the model's template and tokenize them (text parts only)."""
    messages = []
    for i, m in enumerate(chat):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages.{i}.content: only text parts are supported, "
                                        f"got type {part.type!r}", param="messages")
                texts.append(part.text)
            content = "\n".join(texts)
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    try:
        return tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise APIError(400, f"messages: the chat template could not render them: {e}",
                       param="messages") from e


def _entry(v: Logprob) -> dict:
    return {"token": v.decoded_token, "logprob": v.logprob, "bytes": list(v.decoded_token.encode())}


def chat_logprobs(token_ids: list[int], dicts: list[PositionLogprobDict], top_n: int) -> list[dict]:
    content = []
    for tid, d in zip(token_ids, dicts):
        chosen = d.get(tid) or next(iter(d.values()))
        top = sorted((v for v in d.values() if v.rank <= top_n), key=lambda v: v.rank)[:top_n]
        content.append({**_entry(chosen), "top_logprobs": [_entry(v) for v in top]})
    return content


class _ChatView:
    def __init__(self, body: ChatCompletionRequest, num_prompt_tokens: int, request_id: str, model: str):
        self.body, self.num_prompt_tokens, self.model = body, num_prompt_tokens, model
        self.id = f"chatcmpl-{request_id}"
        self.created = int(time.time())
        self.top_n = body.top_logprobs or 0

    def response(self, final: RequestOutput) -> dict:
        choices = []
        for o in final.outputs:
            choice = {"index": o.index, "message": {"role": "assistant", "content": o.text},
                      "logprobs": None, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
            if self.body.logprobs:
                choice["logprobs"] = {"content": chat_logprobs(o.token_ids, o.logprobs or [], self.top_n)}
            choices.append(choice)
        out = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
               "choices": choices,
               "usage": usage(self.num_prompt_tokens, sum(len(o.token_ids) for o in final.outputs),
                              final.num_cached_tokens)}
        if self.body.prompt_logprobs is not None and final.prompt_logprobs is not None:
            out["prompt_logprobs"] = [
                None if d is None else {str(t): {"logprob": v.logprob, "rank": v.rank,
                                                 "decoded_token": v.decoded_token} for t, v in d.items()}
                for d in final.prompt_logprobs]
        return out

    def chunk(self, choices: list[dict], with_usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.model, "choices": choices}
        if self.body.include_usage:
            out["usage"] = with_usage
        return out

    async def stream(self, streams, firsts):
        body = self.body
        finished: set[int] = set()
        completion_tokens = cached_tokens = 0
        try:
            yield sse(self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None} for i in range(body.n)]))
            async for _, out in merge(streams, firsts):
                choices = []
                for o in out.outputs:
                    finish = o.finish_reason if o.finished and o.index not in finished else None
                    if finish:
                        finished.add(o.index)
                    lps = (chat_logprobs(o.token_ids_delta, o.logprobs_delta, self.top_n)
                           if body.logprobs else [])
                    if not (o.text_delta or lps or finish):
                        continue
                    choices.append({"index": o.index,
                                    "delta": {"content": o.text_delta} if o.text_delta else {},
                                    "logprobs": {"content": lps} if body.logprobs else None,
                                    "finish_reason": finish,
                                    "stop_reason": o.stop_reason if finish else None})
                if out.finished:
                    completion_tokens = sum(len(o.token_ids) for o in out.outputs)
                    cached_tokens = out.num_cached_tokens
                if choices:
                    yield sse(self.chunk(choices))
            if body.include_usage:
                yield sse(self.chunk([], usage(self.num_prompt_tokens, completion_tokens, cached_tokens)))
            yield SSE_DONE
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the stream says why it ends, never a clean finish
            yield sse(api_error(e).body())
