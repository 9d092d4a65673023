"""Chat completions on the local engine: messages through the model's chat template, then generate.

Messages (system, developer -> system, user, assistant, tool; string content or
text parts) are rendered with `Tokenizer.apply_chat_template`, which renders the
template the way Hugging Face does. For a vision-language model every message's
content goes to the template as parts (`{"type": "text"}`, `{"type": "image"}`, as HF
processors' templates take them), and each image the template writes as `<image>`
is expanded into its tiles' tokens (engine/image_processor.py); the images, already
fetched and preprocessed (providers/media.py), travel with the engine request. `max_completion_tokens` wins over `max_tokens`; with
neither, generation may run to the context length. Logprobs use the chat format
(`logprobs.content[*]` with token, logprob, bytes and `top_logprobs`). A stream
sends the assistant role first (once the engine has accepted the request), then
content deltas, the finish reason in the chunk where a choice ends, and a usage
chunk last.

The answer's grammar, if any, comes from the request's tools (local_tools.py) or
its output constraint (constraints.py); for a model that thinks, the thinking
comes first and is split off (local_reasoning.py), the grammar applies after it,
and a thinking budget continues the answer as a second engine request of the
same sequence. Text deltas go through the reasoning split, then the tool-call
parser, so `reasoning_content`, `content` and `tool_calls` stream apart.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

import jinja2

from inferd.engine.client.async_client import AsyncEngine
from inferd.engine.image_processor import ImageError, ImageProcessor, ProcessedImage
from inferd.engine.outputs import Logprob, PositionLogprobDict, RequestOutput
from inferd.engine.sampling_params import InvalidParameterError
from inferd.engine.structured import grammar_for, lark_rule
from inferd.engine.tokenizer import ChatTemplateError, Tokenizer
from inferd.providers import local_reasoning, local_tools
from inferd.providers.constraints import output_grammar
from inferd.providers.engine_streams import final_outputs, first_outputs, merge
from inferd.wire.errors import ErrorKind, InferdError
from inferd.wire.request import InferenceRequest
from inferd.wire.schema import ChatCompletionRequest, ChatMessage, content_text, usage


def invalid(message: str, param: str | None) -> InferdError:
    return InferdError(ErrorKind.INVALID_REQUEST, message, status=400, param=param)


def refuse_long_text(engine: AsyncEngine, text_bytes: int, param: str) -> None:
    """A context-length 400 for a prompt sure to exceed the context, before the work of tokenizing it."""
    max_len = engine.info.max_model_len
    if engine.tokenizer.too_long(text_bytes, max_len):
        raise InvalidParameterError(param, f"this model's maximum context length is {max_len} tokens; the "
                                    f"prompt's {text_bytes} bytes are more than that many tokens")


def _content(i: int, content, vision: bool):
    """A message's content for the template: text (parts joined), or for a vision model its parts."""
    if not isinstance(content, list):
        return [{"type": "text", "text": content or ""}] if vision else content or ""
    parts = []
    for j, part in enumerate(content):
        if part.type == "text" and part.text is not None:
            parts.append({"type": "text", "text": part.text})
        elif part.type == "image_url" and vision:
            parts.append({"type": "image"})
        elif part.type == "image_url":
            raise invalid(f"messages.{i}.content.{j}: this model does not take images (it is not a "
                          "vision-language model)", "messages")
        else:
            raise invalid(f"messages.{i}.content.{j}: parts of type {part.type!r} are not supported "
                          "(text and image_url are)", "messages")
    return parts if vision else "\n".join(p["text"] for p in parts)


def encode_messages(tok: Tokenizer, chat: list[ChatMessage], add_generation_prompt: bool,
                    request: ChatCompletionRequest | None = None, continue_final_message: bool = False,
                    images: ImageProcessor | None = None, processed: list[ProcessedImage] = ()) -> list[int]:
    """Render chat messages with the model's template and tokenize them; with the `request` they came
    in, its tools and earlier tool calls too (providers/local_tools.py). `images`: a vision-language
    model's processor, which expands the template's image placeholders into `processed`'s tokens."""
    messages = []
    for i, m in enumerate(chat):
        content = _content(i, m.content, images is not None)
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    extra = {}
    if request is not None:
        messages, extra = local_tools.template_messages(request, messages, "tools" in (tok.spec.chat_template or ""))
        reserved = {"messages", "add_generation_prompt", "continue_final_message", "bos_token", "eos_token", "tools"}
        extra = {**{k: v for k, v in (request.chat_template_kwargs or {}).items() if k not in reserved}, **extra}
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message, **extra)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise invalid(f"messages: the chat template could not render them: {e}", "messages") from e
    if images is not None:
        try:
            text = images.expand(text, list(processed))
        except ImageError as e:
            raise invalid(f"messages: {e}", "messages") from e
    # the template already writes any BOS it wants, as HF's apply_chat_template assumes
    return tok.encode(text, add_special_tokens=False)


def _entry(v: Logprob) -> dict:
    return {"token": v.decoded_token, "logprob": v.logprob, "bytes": list(v.decoded_token.encode())}


def chat_logprobs(token_ids: list[int], dicts: list[PositionLogprobDict], top_n: int) -> list[dict]:
    content = []
    for tid, d in zip(token_ids, dicts):
        chosen = d.get(tid) or next(iter(d.values()))
        top = sorted((v for v in d.values() if v.rank <= top_n), key=lambda v: v.rank)[:top_n]
        content.append({**_entry(chosen), "top_logprobs": [_entry(v) for v in top]})
    return content


def prompt_logprobs_field(out: RequestOutput) -> list | None:
    if out.prompt_logprobs is None:
        return None
    return [None if d is None else {str(t): {"logprob": v.logprob, "rank": v.rank,
                                             "decoded_token": v.decoded_token} for t, v in d.items()}
            for d in out.prompt_logprobs]


class LocalChat:
    """One chat request on a local engine: `response()` or `stream()`."""

    def __init__(self, engine: AsyncEngine, request: InferenceRequest, model: str,
                 images: ImageProcessor | None = None, processed: list[ProcessedImage] = ()):
        body: ChatCompletionRequest = request.body
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs: requires logprobs to be true", "top_logprobs")
        self.engine, self.request, self.body, self.model = engine, request, body, model
        refuse_long_text(engine, sum(len(content_text(m.content).encode()) for m in body.messages), "messages")
        self.prompt_ids = encode_messages(engine.tokenizer, body.messages, body.add_generation_prompt, body,
                                          body.continue_final_message, images, processed)
        self.images = [image.message() for image in processed]
        self.tools = local_tools.active(body)
        tok = engine.tokenizer
        self.thinking = None  # where the prompt leaves the model, when this model's reasoning is split
        if local_reasoning.detect(tok.spec.chat_template, engine.config.reasoning_parser):
            self.thinking = local_reasoning.prompt_state(tok.decode(self.prompt_ids[-16:], skip_special_tokens=False))
        max_tokens = body.output_limit
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        self.answer_grammar = None
        grammar, self.constraint_param = self._grammar(body)
        self.budget = None
        if self.thinking is None and (body.max_reasoning_tokens is not None or body.reasoning_effort):
            param = "max_reasoning_tokens" if body.max_reasoning_tokens is not None else "reasoning_effort"
            raise invalid(f"{param}: {model!r} does not reason (no --reasoning-parser, and its chat template "
                          "does not think)", param)
        if self.thinking in ("thinking", "free"):
            self.budget = local_reasoning.budget(body.max_reasoning_tokens, body.reasoning_effort)
            if self.budget is not None and body.n != 1:
                raise invalid("a thinking budget (max_reasoning_tokens, reasoning_effort) needs n = 1",
                              "max_reasoning_tokens")
            if self.budget is not None and (body.logprobs or body.prompt_logprobs is not None):
                raise invalid("a thinking budget (max_reasoning_tokens, reasoning_effort) cannot be combined "
                              "with logprobs", "logprobs")
        self.params = body.sampling_params(max_tokens, logprobs, body.prompt_logprobs, grammar)
        engine.check_accepting(self.params.n)
        self.id = request.response_id
        self.created = int(time.time())
        self.top_n = body.top_logprobs or 0

    def _grammar(self, body: ChatCompletionRequest) -> tuple[str | None, str | None]:
        """The answer's grammar (tools, or the output constraint), after the thinking when there is any."""
        if self.thinking in (None, "answering"):
            if self.tools:
                return grammar_for("grammar", local_tools.grammar(body), "tools"), "tools"
            return output_grammar(body)
        if self.tools:
            rules, param = local_tools.grammar(body, top="answer"), "tools"
        elif (constraint := body.output_constraint()) is not None:
            kind, spec, param = constraint
            rules = lark_rule("answer", kind, spec, param)
        else:
            return None, None
        # after a thinking budget is spent, the answer is generated on its own, under this grammar
        self.answer_grammar = grammar_for("grammar", local_reasoning.grammar(rules, "answering"), param)
        return grammar_for("grammar", local_reasoning.grammar(rules, self.thinking), param), param

    def _message(self, text: str, finish: str | None) -> tuple[dict, str | None, int]:
        """The assistant message of a whole answer, its finish reason, and its reasoning tokens."""
        reasoning, content = (None, text) if self.thinking is None else local_reasoning.split(text, self.thinking)
        message = {"role": "assistant", "content": content}
        if self.tools:
            message, called = local_tools.message(content or "")
            finish = "tool_calls" if called and finish == "stop" else finish
        if reasoning is not None and self.body.include_reasoning:
            message["reasoning_content"] = reasoning
        return message, finish, self._count(reasoning)

    def _count(self, reasoning: str | None) -> int:
        return len(self.engine.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0

    def _start(self):
        stream = self.engine.generate(self.request.request_id, self.prompt_ids, self.params,
                                      priority=self.body.priority, images=self.images)
        if self.budget is not None:
            stream = local_reasoning.within_budget(self.engine, stream, self.budget, self.thinking, self._answer)
        return [stream]

    def _answer(self, output_ids: list[int]):
        """The rest of an answer whose thinking budget was spent: a continuation of the same sequence."""
        limit = self.params.max_tokens
        params = replace(self.params, grammar=self.answer_grammar,
                         max_tokens=None if limit is None else max(0, limit - len(output_ids)))
        return self.engine.generate(f"{self.request.request_id}.answer", self.prompt_ids + output_ids, params,
                                    priority=self.body.priority, images=self.images)

    async def response(self) -> dict:
        [final] = await final_outputs(self._start())
        choices = []
        reasoning_tokens = 0
        for o in final.outputs:
            message, finish, thought = self._message(o.text, o.finish_reason)
            reasoning_tokens += thought
            choice = {"index": o.index, "message": message,
                      "logprobs": None, "finish_reason": finish, "stop_reason": o.stop_reason}
            if self.body.logprobs:
                choice["logprobs"] = {"content": chat_logprobs(o.token_ids, o.logprobs or [], self.top_n)}
            choices.append(choice)
        out = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
               "choices": choices,
               "usage": usage(len(self.prompt_ids), sum(len(o.token_ids) for o in final.outputs),
                              final.num_cached_tokens, reasoning_tokens if self.thinking else None)}
        if self.body.prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs_field(final)
        return out

    def chunk(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices}

    async def stream(self) -> AsyncIterator[dict]:
        body = self.body
        streams = self._start()
        firsts = await first_outputs(streams)  # admission errors raise here, before any chunk
        finished: set[int] = set()
        calls = [local_tools.CallStream() for _ in range(body.n)] if self.tools else None
        thoughts = [local_reasoning.ReasoningStream(self.thinking) for _ in range(body.n)] if self.thinking else None
        reasoning_text = [""] * body.n
        completion_tokens = cached_tokens = generated = 0
        yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None} for i in range(body.n)])
        async for _, out in merge(streams, firsts):
            choices = []
            for o in out.outputs:
                generated += len(o.token_ids_delta)
                finish = o.finish_reason if o.finished and o.index not in finished else None
                if finish:
                    finished.add(o.index)
                lps = chat_logprobs(o.token_ids_delta, o.logprobs_delta, self.top_n) if body.logprobs else []
                thought, text = o.text_delta, o.text_delta
                if thoughts is not None:
                    thought, text = thoughts[o.index].feed(o.text_delta, final=bool(finish))
                    reasoning_text[o.index] += thought
                delta = {"content": text} if text else {}
                if calls is not None:
                    delta = local_tools.merged(calls[o.index].feed(text, final=bool(finish)))
                    if finish == "stop" and calls[o.index].has_calls:
                        finish = "tool_calls"
                if thoughts is not None and thought and body.include_reasoning:
                    delta = {"reasoning_content": thought, **delta}
                if not (delta or lps or finish):
                    continue
                choices.append({"index": o.index,
                                "delta": delta,
                                "logprobs": {"content": lps} if body.logprobs else None,
                                "finish_reason": finish,
                                "stop_reason": o.stop_reason if finish else None})
            if out.finished:
                completion_tokens = sum(len(o.token_ids) for o in out.outputs)
                cached_tokens = out.num_cached_tokens
            if choices:  # the running count: what metering bills if the client leaves mid-stream
                yield {**self.chunk(choices),
                       "usage": usage(len(self.prompt_ids), generated, out.num_cached_tokens)}
        thought_tokens = sum(self._count(r) for r in reasoning_text) if self.thinking else None
        yield {**self.chunk([]), "usage": usage(len(self.prompt_ids), completion_tokens, cached_tokens, thought_tokens)}
