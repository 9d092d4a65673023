"""Constrained decoding in the engine core: grammar matchers, compiled off the step loop, and their masks.

`GrammarCompiler` builds one llguidance matcher per constrained request on a
worker thread (llguidance releases the GIL while it compiles), so a large schema
never stalls the step loop; compiled grammars are kept by their text (a new
request with the same schema copies the compiled one instead of compiling it
again). The llguidance tokenizer is built from the model's own `tokenizers` JSON
once, on first use.

In a step, `apply_masks` writes each constrained row's allowed-token bitmask and
sets every other logit to -inf; rows without a grammar are not touched, so
unconstrained requests in the same batch pay nothing. The scheduler advances a
request's matcher by the token that was sampled (`Request.matcher`), and a
grammar that admits nothing more ends the request with `stop`; EOS is in the
mask only where the grammar accepts, so an answer cut by `max_tokens` ends with
`length` and never claims to be complete. Matchers can roll back tokens, which
is what checking a run of speculative draft tokens needs: `draft_masks` computes
the mask at each draft position by advancing the matcher through the drafts and
rolling it back, so the matcher itself only ever advances by accepted tokens (the
scheduler's), and a draft the grammar refuses is cut before it is scheduled
(engine/spec_decode/speculator.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading

import torch

from inferd.engine.structured import limits
from inferd.models.checkpoint import TokenizerSpec

_CACHE_SIZE = 128


class GrammarCompiler:
    def __init__(self, spec: TokenizerSpec, vocab_size: int, eos_token_ids: list[int]):
        self._spec, self._vocab_size, self._eos = spec, vocab_size, list(eos_token_ids)
        self._tokenizer = None
        self._lock = threading.Lock()
        self._compiled: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inferd-grammar")

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                from llguidance import LLTokenizer

                self._tokenizer = LLTokenizer(self._spec.tokenizer_json, n_vocab=self._vocab_size,
                                              eos_token=self._eos)
            return self._tokenizer

    def submit(self, grammar: str) -> concurrent.futures.Future:
        """A future of a fresh matcher for `grammar` (its exception: why it does not compile)."""
        return self._pool.submit(self.matcher, grammar)

    def matcher(self, grammar: str):
        from llguidance import LLMatcher

        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
        if template is None:
            template = LLMatcher(self.tokenizer, grammar, log_level=0, limits=limits())
            if template.is_error():
                raise ValueError(template.get_error())
            with self._lock:
                self._compiled[grammar] = template
                while len(self._compiled) > _CACHE_SIZE:
                    self._compiled.popitem(last=False)
        return template.deep_copy()


def _words(vocab: int) -> int:
    return (vocab + 31) // 32


def draft_masks(matcher, drafts: list[int], vocab: int) -> torch.Tensor:
    """The matcher's bitmask at each of the len(drafts) + 1 positions of a draft run; the matcher is left
    where it was. Positions past a draft the grammar refuses (or after which it stops) allow nothing."""
    words = _words(vocab)
    masks = torch.zeros(len(drafts) + 1, words, dtype=torch.int32)
    consumed = 0
    for i in range(len(drafts) + 1):
        if matcher.is_stopped():
            break
        matcher.unsafe_compute_mask_ptr(masks[i].data_ptr(), words * 4)
        if i == len(drafts) or not matcher.consume_token(drafts[i]):
            break
        consumed += 1
    if consumed:
        matcher.rollback(consumed)
    return masks


def apply_masks(logits: torch.Tensor, matchers: list) -> torch.Tensor:
    """Keep only the grammar-allowed tokens of each row whose matcher is not None (a matcher, or a
    bitmask row from `draft_masks`)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    words = _words(vocab)
    bitmask = torch.empty(len(rows), words, dtype=torch.int32)
    for j, i in enumerate(rows):
        m = matchers[i]
        if isinstance(m, torch.Tensor):
            bitmask[j] = m
        else:
            m.unsafe_compute_mask_ptr(bitmask[j].data_ptr(), words * 4)
    # the bitmask (4 bytes per 32 tokens) goes to the logits' device, not the logits to the host
    bitmask = bitmask.to(logits.device)
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=logits.device)) & 1
    allowed = bits.reshape(len(rows), words * 32)[:, :vocab].bool()
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits
