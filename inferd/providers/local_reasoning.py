"""Reasoning output on the local engine: thinking in tags, apart from the answer.

Models that think write `<think>…</think>` before their answer (DeepSeek-R1,
Qwen3, SmolLM3 and the like); many templates open the tag in the prompt, so the
output starts inside the thinking. A deployment turns this on with
`--reasoning-parser think` (vLLM's `deepseek_r1` and `qwen3` are accepted as the
same), or by itself when the model's chat template writes `<think>`.

- The answer's `message.reasoning_content` (vLLM's field; `delta.reasoning_content`
  in streams) holds the thinking and `content` only the answer; an answer cut
  inside its thinking has no content. `usage.completion_tokens_details.
  reasoning_tokens` counts the thinking.
- Structured output and tool calls apply to the answer: the grammar lets the
  thinking run free (any text without the end tag) and switches to the
  constraint at `</think>`.
- A thinking budget (`max_reasoning_tokens`, or OpenAI's `reasoning_effort`:
  minimal 0, low 512, medium 2048, high 8192 tokens): generation stops when the
  budget is spent inside the thinking, the end tag is appended, and the answer is
  generated as a continuation of the same sequence (its prefix comes from the
  prefix cache), under the answer's constraint if there is one.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, replace

START, END = "<think>", "</think>"
PARSERS = ("think", "deepseek_r1", "qwen3")
EFFORT_BUDGETS = {"minimal": 0, "low": 512, "medium": 2048, "high": 8192}


def detect(chat_template: str | None, parser: str | None) -> bool:
    """Whether a deployment splits reasoning: its `--reasoning-parser`, else whether its template thinks."""
    if parser is not None:
        if parser == "none":
            return False
        if parser not in PARSERS:
            raise ValueError(f"reasoning parser: {parser!r} is not known; use one of {', '.join(PARSERS)} "
                             "or none")
        return True
    return START in (chat_template or "")


def budget(max_reasoning_tokens: int | None, effort: str | None) -> int | None:
    """The most thinking tokens a request allows (None: no limit)."""
    if max_reasoning_tokens is not None:
        return max_reasoning_tokens
    return EFFORT_BUDGETS.get(effort) if effort else None


def prompt_state(prompt_tail: str) -> str:
    """Where the prompt leaves the model: 'thinking' (it opened the tag), 'answering' (it opened and
    closed it: thinking turned off), or 'free' (the model may open it itself)."""
    tail = prompt_tail.rstrip()
    if tail.endswith(START):
        return "thinking"
    if tail.endswith(END):
        return "answering"
    return "free"


def grammar(answer_rules: str | None, state: str) -> str | None:
    """A Lark grammar: free thinking up to the end tag (a lazy lexeme that stops at it), then the answer
    (`answer_rules` define rule `answer`). None when the answer is free: thinking needs no grammar."""
    if answer_rules is None:
        return None
    if state == "answering":
        return "start: answer\n" + answer_rules
    opening = "" if state == "thinking" else f'"{START}" '
    return f'start: {opening}think answer\nthink[stop="{END}"]: /(.|\\n)*/\n{answer_rules}'


def split(text: str, state: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole answer."""
    reasoning, content = _split(text, state, final=True)
    return reasoning or None, content or None


def _split(text: str, state: str, final: bool) -> tuple[str, str]:
    if state == "answering":
        return "", text
    if state == "free":
        stripped = text.lstrip()
        if not stripped.startswith(START):
            if not final and START.startswith(stripped):
                return "", ""  # may still be opening the tag
            return "", text
        text = stripped[len(START):]
    end = text.find(END)
    if end < 0:
        if final:
            return text, ""
        for k in range(min(len(END) - 1, len(text)), 0, -1):  # hold back what may start the end tag
            if END.startswith(text[-k:]):
                return text[:-k], ""
        return text, ""
    return text[:end], text[end + len(END):].lstrip("\n")  # the blank lines a template puts after the tag


@dataclass
class ReasoningStream:
    """One choice's text deltas in, (reasoning delta, content delta) out; the pieces add up to `split`."""

    state: str
    text: str = ""
    sent_reasoning: int = 0
    sent_content: int = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        reasoning, content = _split(self.text, self.state, final)
        out = reasoning[self.sent_reasoning:], content[self.sent_content:]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return out


def still_thinking(text: str, state: str) -> bool:
    """Whether `text` (the output so far) is inside the thinking: opened (by the prompt or by it) and not
    closed."""
    if state == "answering":
        return False
    if state == "free":
        stripped = text.lstrip()
        if not stripped.startswith(START):
            return False
        text = stripped[len(START):]
    return END not in text


async def within_budget(engine, first, limit: int, state: str, continuation):
    """The outputs of one sample (`first`, an engine stream with n=1), thinking at most `limit` tokens:
    when the limit is spent inside the thinking, `first` is stopped at exactly `limit` tokens, the end
    tag is appended, and the answer comes from `continuation(token_ids_so_far)`, an engine stream of
    the rest; its outputs are given as one sequence with the first's (text and token ids cumulative,
    deltas as they come). Outputs may carry several tokens each, so the cut is made inside one."""
    tok = engine.tokenizer
    sent, last, answering = "", None, False
    async with aclosing(first):
        async for out in first:
            o, last = out.outputs[0], out
            text = ""
            # an output may carry many tokens, the last ones included: the budget is checked inside it
            if not answering and len(o.token_ids) > limit:
                ids = o.token_ids[:limit]
                text = tok.decode(ids)
                if not text.startswith(sent):  # a character cut in two: keep what was already sent
                    text = sent + tok.decode(ids[len(o.token_ids) - len(o.token_ids_delta):])
                answering = not still_thinking(text, state)  # it closed the thinking within its budget
            if answering or len(o.token_ids) <= limit:
                answering = answering or not still_thinking(o.text, state)
                sent = o.text
                yield out
                if out.finished:
                    return
                continue
            break
        else:
            return
    closing = END + "\n\n"
    forced = tok.encode(closing, add_special_tokens=False)
    delta = text[len(sent):] + closing
    text, ids = text + closing, ids + forced
    yield replace(last, finished=False, outputs=[replace(
        o, text=text, token_ids=ids, text_delta=delta, token_ids_delta=ids[len(o.token_ids) - len(o.token_ids_delta):],
        logprobs_delta=[], finish_reason=None)])
    async with aclosing(continuation(ids)) as rest:
        async for out in rest:
            a = out.outputs[0]
            yield replace(out, prompt_token_ids=last.prompt_token_ids, num_cached_tokens=last.num_cached_tokens,
                          outputs=[replace(a, text=text + a.text, token_ids=ids + a.token_ids)])
