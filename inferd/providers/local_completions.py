"""Text completions on the local engine (the legacy endpoint, and lm-eval's).

A prompt is a string, a list of strings, a token id list or a list of token id
lists; each becomes one engine request with `n` samples, and choice indices run
prompt-major (prompt i, sample j -> i * n + j), as OpenAI does. `echo` prepends
the prompt; with `logprobs` it also returns the prompt tokens' logprobs (the first
token has none), which with `max_tokens: 0` is lm-eval's loglikelihood request.
Logprobs use the completions format: tokens, token_logprobs, top_logprobs
(token string -> logprob, the sampled token included) and text_offset.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from inferd.engine.client.async_client import AsyncEngine
from inferd.engine.outputs import PositionLogprobDict, RequestOutput
from inferd.engine.tokenizer import Tokenizer
from inferd.providers.constraints import output_grammar
from inferd.providers.engine_streams import final_outputs, first_outputs, merge
from inferd.providers.local_chat import invalid, prompt_logprobs_field, refuse_long_text
from inferd.wire.request import InferenceRequest
from inferd.wire.schema import CompletionRequest, usage


def _texts(prompt) -> list[str]:
    return [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]


def _prompts(prompt, tok: Tokenizer) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        items = [prompt]
    elif not prompt:
        raise invalid("prompt: must not be empty", "prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    return [(p, tok.encode(p)) if isinstance(p, str) else (None, list(p)) for p in items]


class LocalCompletion:
    """One completions request on a local engine: `response()` or `stream()`."""

    def __init__(self, engine: AsyncEngine, request: InferenceRequest, model: str):
        body: CompletionRequest = request.body
        if body.suffix:
            raise invalid("suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise invalid("best_of: only best_of equal to n is supported", "best_of")
        self.engine, self.request, self.body, self.model = engine, request, body, model
        self.tok = engine.tokenizer
        refuse_long_text(engine, max((len(p.encode()) for p in _texts(body.prompt)), default=0), "prompt")
        self.prompts = _prompts(body.prompt, self.tok)
        prompt_lp = body.prompt_logprobs
        if prompt_lp is None and body.echo and body.logprobs is not None:
            prompt_lp = body.logprobs
        grammar, self.constraint_param = output_grammar(body)
        self.params = body.sampling_params(body.max_tokens, body.logprobs, prompt_lp, grammar)
        engine.check_accepting(self.params.n * len(self.prompts))
        self.id = request.response_id
        self.created = int(time.time())
        self.n = body.n

    def _start(self):
        # one engine request per prompt, named after the request (a single prompt: the request id itself)
        rid = self.request.request_id
        return [self.engine.generate(rid if len(self.prompts) == 1 else f"{rid}-{i}", ids, self.params, text, priority=self.body.priority)
                for i, (text, ids) in enumerate(self.prompts)]

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

    async def response(self) -> dict:
        body, choices = self.body, []
        finals = await final_outputs(self._start())
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
                    choice["prompt_logprobs"] = prompt_logprobs_field(final)
                choices.append(choice)
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def chunk(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}

    async def stream(self) -> AsyncIterator[dict]:
        body = self.body
        streams = self._start()
        firsts = await first_outputs(streams)  # admission errors raise here, before any chunk
        started: set[int] = set()
        finished: set[int] = set()
        offsets: dict[int, int] = {}
        completion_tokens = [0] * len(self.prompts)
        cached_tokens = [0] * len(self.prompts)
        generated = [0] * len(self.prompts)
        prompt_tokens = sum(len(ids) for _, ids in self.prompts)
        async for i, out in merge(streams, firsts):
            choices = []
            for o in out.outputs:
                generated[i] += len(o.token_ids_delta)
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
                    choice["prompt_logprobs"] = prompt_logprobs_field(out)
                choices.append(choice)
            if out.finished:
                completion_tokens[i] = sum(len(o.token_ids) for o in out.outputs)
            cached_tokens[i] = out.num_cached_tokens
            if choices:  # the running count: what metering bills if the client leaves mid-stream
                yield {**self.chunk(choices), "usage": usage(prompt_tokens, sum(generated), sum(cached_tokens))}
        yield {**self.chunk([]), "usage": usage(prompt_tokens, sum(completion_tokens), sum(cached_tokens))}
