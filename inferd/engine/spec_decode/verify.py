"""Verifying drafts: the sampler's view of a request at each draft position, and the acceptance rule.

A request with d drafts in a step has d + 1 positions to sample: after its last
known token, and after each draft. `DraftRow` is the request as it would be at
draft position i (its output extended by the first i drafts): what penalties,
min_tokens and the grammar's mask read, so every position is processed exactly
as plain decoding would process it, had the drafts before it been sampled.

The rule (`accepted`): each position is sampled from the target model's own
distribution, with the same noise plain decoding would use there (a seeded
request's noise is keyed by output position, engine/core/sampler.py), and a draft
is accepted while it equals the token sampled at its position. For a proposer
whose draft is a single token t (a point mass q, as prompt lookup and greedy
drafting are), this is rejection sampling exactly: t is accepted with probability
p(t) = min(1, p(t)/q(t)), and on rejection the sampled token is distributed as p
with t removed and renormalized, the residual. So the output distribution is the
target's, greedy output is plain greedy output, and a seeded request gives the
same tokens with speculation on or off.
"""

from __future__ import annotations

from inferd.engine.core.request import Request


class DraftRow:
    """Request `req` at draft position `i` (i = 0: right after its known tokens)."""

    __slots__ = ("req", "i", "matcher")

    def __init__(self, req: Request, i: int, matcher=None):
        self.req, self.i = req, i
        self.matcher = matcher  # the grammar's mask at this position (a bitmask row), or None

    @property
    def params(self):
        return self.req.params

    @property
    def generator(self):
        return self.req.generator

    @property
    def eos_token_ids(self):
        return self.req.eos_token_ids

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.req.prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.req.output_token_ids + self.req.spec_token_ids[:self.i]

    @property
    def num_output_tokens(self) -> int:
        return self.req.num_output_tokens + self.i


def accepted(sampled: list[int], drafts: list[int]) -> list[int]:
    """The tokens a step adds: the drafts up to the first one that differs from what was sampled at its
    position, then the token sampled there (or, all accepted, the one sampled after the last draft).
    `sampled` has len(drafts) + 1 entries."""
    j = 0
    while j < len(drafts) and sampled[j] == drafts[j]:
        j += 1
    return sampled[:j + 1]
