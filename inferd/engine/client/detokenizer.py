"""Incremental detokenization and stop strings.

`IncrementalDetokenizer` turns tokens into text one at a time. Decoding a single
token is wrong for byte-level and byte-fallback vocabularies (one character can
span tokens) and for SentencePiece (leading spaces depend on context), so it
decodes a small window: the text of tokens[prefix:] minus the text of
tokens[prefix:read], emitting only once the window no longer ends in an
incomplete character (U+FFFD). The window starts on the last prompt tokens so the
first output token gets its real leading space.

`StopStringMatcher` cuts the text at the first stop string and holds back any
tail that could still grow into one, so a partial stop string never leaks into
streamed output.
"""

from __future__ import annotations

from inferd.engine.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.tokens = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Feed new tokens; returns the text they complete (maybe ""). `final` flushes."""
        self.tokens.extend(token_ids)
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) and not final:
            return ""
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        self.text += delta
        return delta


class StopStringMatcher:
    def __init__(self, stops: list[str], include_stop: bool = False):
        self.stops = stops
        self.include_stop = include_stop
        self.max_len = max((len(s) for s in stops), default=0)

    def find(self, text: str, new_chars: int) -> tuple[int, str] | None:
        """First stop string that ends within the last `new_chars` characters: (cut, stop)."""
        if not self.stops:
            return None
        begin = max(0, len(text) - new_chars - self.max_len + 1)
        best = None
        for s in self.stops:
            i = text.find(s, begin)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        return (i + len(s) if self.include_stop else i), s

    def holdback(self, text: str) -> int:
        """How many trailing characters could be the start of a stop string."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
