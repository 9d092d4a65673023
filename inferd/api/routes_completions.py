"""POST /v1/completions: the legacy text completions endpoint (and lm-eval's).

A prompt is a string, a list of strings, a token id list or a list of token id
lists; each becomes one engine request with `n` samples, and choice indices run
prompt-major (prompt i, sample j -> i * n + j), as OpenAI does. `echo` prepends
the prompt; with `logprobs` it also returns the prompt tokens' logprobs (the first
token has none), which with `max_tokens: 0` is lm-eval's loglikelihood request.
Logprobs use the completions format: tokens, token_logprobs, top_logprobs
(token string -> logprob, the sampled token included) and text_offset.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse

from inferd.api.errors import APIError, api_error
from inferd.api.protocol import (SSE_DONE, SSE_HEADERS, CompletionRequest, cancel_on_disconnect,
                                 final_outputs, first_outputs, json_response, merge, sse, state, usage)
from inferd.engine.outputs import PositionLogprobDict, RequestOutput
from inferd.engine.tokenizer import Tokenizer

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    st = state(request)
    st.check_model(body.model)
    engine, tok = st.engine, st.engine.tokenizer
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of: only best_of equal to n is supported", param="best_of")
    prompts = _prompts(body.prompt, tok)
    prompt_lp = body.prompt_logprobs
    if prompt_lp is None and body.echo and body.logprobs is not None:
        prompt_lp = body.logprobs
    params = body.sampling_params(body.max_tokens, body.logprobs, prompt_lp)
    engine.check_accepting(params.n * len(prompts))
    base = uuid.uuid4().hex
    streams = [engine.generate(f"{base}-{i}", ids, params, text) for i, (text, ids) in enumerate(prompts)]
    view = _View(body, prompts, tok, request.state.request_id, st.model_name)
    if not body.stream:
        finals = await cancel_on_disconnect(request, final_outputs(streams))
        return json_response(view.response(finals))
    firsts = await cancel_on_disconnect(request, first_outputs(streams))
    return StreamingResponse(view.stream(streams, firsts), media_type="text/event-stream",
                             headers=SSE_HEADERS)


def _prompts(prompt, tok: Tokenizer) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        items = [prompt]
    elif not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    return [(p, tok.encode(p)) if isinstance(p, str) else (None, list(p)) for p in items]


class _View:
    """Turns engine outputs into completions responses and stream chunks."""

    def __init__(self, body: CompletionRequest, prompts, tok: Tokenizer, request_id: str, model: str):
        self.body, self.prompts, self.tok, self.model = body, prompts, tok, model
        self.id = f"cmpl-{request_id}"
        self.created = int(time.time())
        self.n = body.n

    def prompt_text(self, i: int) -> str:
        text, ids = self.prompts[i]
        return text if text is not None else self.tok.decode(ids, skip_special_tokens=False)

    def prompt_entries(self, i: int, out: RequestOutput) -> list[tuple[int, PositionLogprobDict | None]]:
        ids = self.prompts[i][1]
        plp = out.prompt_logprobs or []
        return [(t, plp[j] if j < len(plp) else None) for j, t in enumerate(ids)]

    def logprobs(self, entries, offset: int) -> tuple[dict, int]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, d in entries:
            if d is None:
                s, lp, top = self.tok.decode([tid], skip_special_tokens=False), None, None
            else:
                chosen = d.get(tid) or next(iter(d.values()))
                s, lp = chosen.decoded_token, chosen.logprob
                top = {}
                for v in d.values():  # tokens that decode alike share a key: keep the likeliest
                    if v.logprob > top.get(v.decoded_token, float("-inf")):
                        top[v.decoded_token] = v.logprob
            tokens.append(s)
            token_lps.append(lp)
            tops.append(top)
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}, offset

    def _prompt_logprobs_field(self, out: RequestOutput):
        if self.body.prompt_logprobs is None or out.prompt_logprobs is None:
            return None
        return [None if d is None else {str(t): {"logprob": v.logprob, "rank": v.rank,
                                                 "decoded_token": v.decoded_token} for t, v in d.items()}
                for d in out.prompt_logprobs]

    def response(self, finals: list[RequestOutput]) -> dict:
        body, choices = self.body, []
        prompt_tokens = completion_tokens = cached_tokens = 0
        for i, final in enumerate(finals):
            prompt_tokens += len(self.prompts[i][1])
            cached_tokens += final.num_cached_tokens
            echo = self.prompt_text(i) if body.echo else ""
            for o in final.outputs:
                completion_tokens += len(o.token_ids)
                choice = {"index": i * self.n + o.index, "text": echo + o.text, "logprobs": None,
                          "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                if body.logprobs is not None:
                    entries = self.prompt_entries(i, final) if body.echo else []
                    entries += list(zip(o.token_ids, o.logprobs or []))
                    choice["logprobs"], _ = self.logprobs(entries, 0 if body.echo else len(self.prompt_text(i)))
                if body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self._prompt_logprobs_field(final)
                choices.append(choice)
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def chunk(self, choices: list[dict], with_usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": choices}
        if self.body.include_usage:
            out["usage"] = with_usage
        return out

    async def stream(self, streams, firsts):
        body = self.body
        started: set[int] = set()
        finished: set[int] = set()
        offsets: dict[int, int] = {}
        completion_tokens = [0] * len(self.prompts)
        cached_tokens = [0] * len(self.prompts)
        try:
            async for i, out in merge(streams, firsts):
                choices = []
                for o in out.outputs:
                    idx = i * self.n + o.index
                    text = o.text_delta
                    entries = list(zip(o.token_ids_delta, o.logprobs_delta)) if body.logprobs is not None else []
                    if idx not in started:
                        if not (o.token_ids_delta or o.finished):
                            continue  # prompt work only so far: wait for the first token
                        started.add(idx)
                        offsets[idx] = 0 if body.echo else len(self.prompt_text(i))
                        if body.echo:
                            text = self.prompt_text(i) + text
                            entries = self.prompt_entries(i, out) + entries if body.logprobs is not None else []
                    finish = o.finish_reason if o.finished and idx not in finished else None
                    if finish:
                        finished.add(idx)
                    if not (text or entries or finish):
                        continue
                    choice = {"index": idx, "text": text, "logprobs": None, "finish_reason": finish,
                              "stop_reason": o.stop_reason if finish else None}
                    if body.logprobs is not None:
                        choice["logprobs"], offsets[idx] = self.logprobs(entries, offsets[idx])
                    if finish and body.prompt_logprobs is not None:
                        choice["prompt_logprobs"] = self._prompt_logprobs_field(out)
                    choices.append(choice)
                if out.finished:
                    completion_tokens[i] = sum(len(o.token_ids) for o in out.outputs)
                    cached_tokens[i] = out.num_cached_tokens
                if choices:
                    yield sse(self.chunk(choices))
            if body.include_usage:
                prompt_tokens = sum(len(ids) for _, ids in self.prompts)
                yield sse(self.chunk([], usage(prompt_tokens, sum(completion_tokens), sum(cached_tokens))))
            yield SSE_DONE
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the stream says why it ends, never a clean finish
            yield sse(api_error(e).body())
