"""Mid-stream failover: what the client already has of a broken stream, and how another deployment finishes it.

When a stream breaks after the client received part of the answer (a cut, a stall,
a malformed chunk, an error event), the router asks another deployment to finish
the answer in the same stream (router.py, `OpenStream`). This module holds the
three pieces it needs:

- `Progress` follows the chunks the client got: the answer's text, how many
  content chunks (tokens) it had, and whether it can be continued at all. A
  stream is not continued when it has more than one choice, streamed tool calls
  or reasoning (a continuation could not be stitched to them faithfully), or
  asked for `echo`.
- `continuation()` builds the request for the next deployment. One that takes an
  assistant prefill (`Deployment.takes_prefill`: inferd's own engines, Anthropic,
  OpenAI-compatible servers configured with `prefill: true`) gets the
  conversation with the partial answer as the final assistant message,
  `continue_final_message` set, and what is left of the token budget. A
  completions request gets the partial answer appended to its prompt: every
  completions API continues its prompt. A deployment without prefill gets the
  original request again, and its answer must repeat the text the client has.
- `PrefixFilter` holds a continuation's text back until it covers what must not
  be sent twice: with a prefill, the trailing whitespace left out of the prefill
  (Anthropic refuses a prefill that ends in whitespace; templates trim it); when
  regenerating, the whole text the client has. A regenerated answer that does
  not start with exactly that text is refused, and the stream ends with the
  original error: text already sent is never repeated or contradicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inferd.wire.request import InferenceRequest, parse_request


@dataclass
class Progress:
    """The part of the answer a stream delivered to the client."""

    endpoint: str
    text: str = ""
    tokens: int = 0                 # content chunks: one token each from the providers here
    blocker: str | None = None      # why the answer cannot be continued elsewhere
    finished: bool = False          # a finish_reason arrived: nothing is left to continue

    def observe(self, chunk: dict) -> None:
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                self.blocker = "more than one choice"
                continue
            if choice.get("finish_reason") is not None:
                self.finished = True
            if self.endpoint == "chat":
                delta = choice.get("delta") or {}
                if delta.get("tool_calls") or delta.get("reasoning_content") or delta.get("reasoning"):
                    self.blocker = "tool calls or reasoning were streamed"
                piece = delta.get("content")
            else:
                piece = choice.get("text")
            if piece:
                self.text += piece
                self.tokens += 1


def blocker(request: InferenceRequest) -> str | None:
    """Why no broken stream of `request` can be continued, whatever it delivered (None: it can)."""
    body = request.body
    if getattr(body, "n", 1) != 1:
        return "n > 1"
    if request.endpoint == "completions" and (getattr(body, "echo", False) or not isinstance(body.prompt, str)):
        return "the prompt is not one string, or echo is set"
    return None


@dataclass
class Continuation:
    request: InferenceRequest
    expected: str        # text the continuation must start with, which is not sent again
    strict: bool         # False: `expected` is whitespace that may or may not come


def continuation(request: InferenceRequest, progress: Progress, prefill: bool) -> Continuation:
    """The request that makes a deployment (`prefill`: it takes an assistant prefill) finish the answer."""
    if request.endpoint == "chat" and not prefill:
        return Continuation(request, progress.text, strict=True)
    raw = dict(request.raw)
    limit = request.body.output_limit
    if limit is not None:  # the rest of the budget: the answer as a whole keeps the client's limit
        for name in ("max_tokens", "max_completion_tokens"):
            if raw.get(name) is not None:
                raw[name] = max(1, limit - progress.tokens)
    if request.endpoint == "completions":
        raw["prompt"] = request.body.prompt + progress.text
        expected = ""
    else:
        head = progress.text.rstrip()
        raw["messages"] = [*raw["messages"], {"role": "assistant", "content": head}]
        raw["continue_final_message"], raw["add_generation_prompt"] = True, False
        expected = progress.text[len(head):]
    typed = parse_request(request.endpoint, raw, request_id=request.request_id, caller=request.caller,
                          batch_id=request.batch_id)
    return Continuation(typed, expected, strict=False)


@dataclass
class PrefixFilter:
    """Drops `expected` from the start of a continuation's text; `take` returns what may be sent."""

    expected: str
    strict: bool
    _held: str = field(default="", init=False)
    done: bool = field(default=False, init=False)

    def take(self, piece: str) -> str:
        """The part of `piece` the client does not have yet ("" while still held back); raises
        `Mismatch` when the continuation contradicts the text already sent."""
        if self.done:
            return piece
        if not self.strict:
            self.done = True  # only whitespace is expected: drop as much of it as comes first
            n = 0
            while n < min(len(piece), len(self.expected)) and piece[n].isspace():
                n += 1
            return piece[n:]
        self._held += piece
        if len(self._held) < len(self.expected):
            if not self.expected.startswith(self._held):
                raise Mismatch()
            return ""
        if not self._held.startswith(self.expected):
            raise Mismatch()
        self.done = True
        return self._held[len(self.expected):]

    def finish(self) -> None:
        """The continuation ended: it must have covered the expected text."""
        if not self.done and self.strict and self.expected:
            raise Mismatch()


class Mismatch(Exception):
    """A regenerated answer that does not repeat what the client already has."""
