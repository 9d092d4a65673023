"""Inputs of an embedding request -> token id lists, validated against the model's limits.

Texts are tokenized with the model's tokenizer.json, special tokens added ([CLS]
... [SEP] for BERT), so an empty string is a valid two-token input. The file's own
truncation and padding settings are switched off: batching pads, and truncation
happens only when the caller asks for it, keeping the closing special token, as
sentence-transformers truncates. Token id inputs are taken as they are (no
special tokens added, as vLLM does) and, with `truncate`, cut to their first
`max_len` ids.

Token counts include special tokens: they are what the model computes, and what
usage reports as prompt tokens. Errors are `InvalidParameterError("input", ...)`
saying which input was wrong and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

from inferd.engine.embedding.spec import EmbedSpec
from inferd.engine.sampling_params import InvalidParameterError

EmbedInputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


class EmbedTokenizer:
    def __init__(self, spec: EmbedSpec):
        self.spec = spec
        self._full = Tokenizer.from_str(spec.tokenizer_json)
        self._full.no_truncation()
        self._full.no_padding()
        self._truncating = Tokenizer.from_str(spec.tokenizer_json)
        self._truncating.no_padding()
        self._truncating.enable_truncation(spec.max_len)

    def encode(self, inputs: EmbedInputs, truncate: bool = False) -> list[list[int]]:
        """One token id list per input; raises InvalidParameterError on a bad or too long input."""
        items = _as_list(inputs)
        if isinstance(items[0], str):
            return self._encode_texts(items, truncate)
        return [self._check_ids(i, ids, truncate) for i, ids in enumerate(items)]

    def _encode_texts(self, texts: list[str], truncate: bool) -> list[list[int]]:
        if self.spec.do_lower_case:
            texts = [t.lower() for t in texts]
        ids = [e.ids for e in self._full.encode_batch(texts)]
        too_long = [i for i, x in enumerate(ids) if len(x) > self.spec.max_len]
        if too_long and not truncate:
            raise self._too_long(too_long[0], len(ids[too_long[0]]))
        if too_long:
            cut = self._truncating.encode_batch([texts[i] for i in too_long])
            for i, enc in zip(too_long, cut):
                ids[i] = enc.ids
        return ids

    def _check_ids(self, index: int, ids: Sequence[int], truncate: bool) -> list[int]:
        if not ids:
            raise InvalidParameterError("input", f"input[{index}] is an empty list of token ids")
        vocab = self.spec.vocab_size
        for t in ids:
            if type(t) is not int or not 0 <= t < vocab:
                raise InvalidParameterError(
                    "input", f"input[{index}] has token id {t!r}; token ids must be integers in [0, {vocab})")
        if len(ids) > self.spec.max_len:
            if not truncate:
                raise self._too_long(index, len(ids))
            ids = ids[:self.spec.max_len]
        return list(ids)

    def _too_long(self, index: int, length: int) -> InvalidParameterError:
        return InvalidParameterError(
            "input", f"input[{index}] has {length} tokens, more than the maximum of {self.spec.max_len} "
            f"tokens of {self.spec.model_name}; shorten it or ask for truncation")


def _as_list(inputs: EmbedInputs) -> list:
    """A list of strings or a list of token id lists; one string or one id list is one input."""
    if isinstance(inputs, str):
        return [inputs]
    if not isinstance(inputs, Sequence) or isinstance(inputs, (bytes, bytearray)):
        raise InvalidParameterError("input", "must be a string, a list of strings, or a list of token id lists")
    items = list(inputs)
    if not items:
        raise InvalidParameterError("input", "must not be empty")
    if all(type(t) is int for t in items):
        return [items]
    if all(isinstance(t, str) for t in items):
        return items
    if all(isinstance(t, Sequence) and not isinstance(t, (str, bytes, bytearray)) for t in items):
        return items
    raise InvalidParameterError(
        "input", "must be a string, a list of strings, or a list of token id lists (not a mix)")
