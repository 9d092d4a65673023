"""Drafts into the step, acceptance and step cost out of it, and the speculative-decoding metrics.

`EngineCore.step` calls `extend` after the scheduler has made the step: every
scheduled request whose tokens reach the end of what it knows (a decode, or the
last chunk of a prompt) may get drafts, up to what max_tokens and the context
leave. With prompt lookup, each gets the draft its index finds, cut to what its
grammar accepts; `policy.choose` (or, with `adaptive` off, the config) says how many
of those drafts each request computes, and the scheduler adds them while the budget
and the free blocks allow. With a draft model, proposing costs a forward per draft
position, so the policy first says how many drafts each request gets (counting the
draft model's measured cost), the scheduler reserves their room, the draft model
proposes them in one batch (spec_decode/draft_model.py), under each request's grammar.
After the step, `observe` records the step's wall time against the number of
tokens it computed and each request's accepted drafts.

Metrics (vLLM's names): drafts (requests that verified drafts in a step), draft
tokens, accepted tokens, and accepted tokens per draft position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inferd.engine.core.request import Request
from inferd.engine.core.scheduler import Scheduler, SchedulerOutput, StepResult
from inferd.engine.spec_decode.config import SpeculativeConfig
from inferd.engine.spec_decode.draft_model import DraftModel
from inferd.engine.spec_decode.ngram import NgramIndex
from inferd.engine.spec_decode.policy import Acceptance, DraftCharge, StepCost, choose

_PRIOR_DECAY = 0.05  # weight of one request's verification in the acceptance rate seen across requests
_DRAFT_MODEL_PRIOR = 0.8  # the acceptance rate a draft model starts with


@dataclass
class SpecDecodeStats:
    """Counters since start (exported as spec_decode_* metrics)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [k]: drafts accepted at position k


class _RequestState:
    __slots__ = ("index", "acceptance")

    def __init__(self, config: SpeculativeConfig):
        self.index = (NgramIndex(config.prompt_lookup_min, config.prompt_lookup_max)
                      if config.method == "ngram" else None)
        self.acceptance = Acceptance()


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft: DraftModel | None = None):
        self.config = config
        self.max_model_len = max_model_len
        self.draft = draft  # the draft-model proposer, or None for prompt lookup
        self.cost = StepCost()
        # acceptance rate across requests, the prior of a new request's; a draft model with the target's
        # tokenizer is expected to agree most of the time (until its verifications say otherwise), and a
        # pessimistic start would keep the first requests from ever paying for the draft's catch-up
        self.prior = 0.5 if draft is None else _DRAFT_MODEL_PRIOR
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * config.num_speculative_tokens)

    def _limit(self, req: Request) -> int:
        """The most drafts worth computing: the step samples one token more than it drafts."""
        k = min(self.config.num_speculative_tokens, self.max_model_len - req.num_tokens)
        if req.params.max_tokens is not None:
            k = min(k, req.params.max_tokens - req.num_output_tokens - 1)
        return k

    def extend(self, scheduler: Scheduler, out: SchedulerOutput) -> None:
        """Add draft tokens to a scheduled step."""
        if out.budget_left <= 0:
            return
        candidates: list[tuple[Request, int]] = []  # (request, most drafts it can use)
        outputs = 0
        for req in out.requests:
            if req.num_computed_tokens + out.num_new_tokens[req.request_id] != req.num_tokens:
                continue  # a prompt chunk that samples nothing yet
            outputs += 1
            k = self._limit(req)
            if k <= 0:
                continue
            if req.spec is None:
                req.spec = _RequestState(self.config)
            candidates.append((req, k))
        if not candidates:
            return
        if self.draft is None:  # prompt lookup costs nothing: find the drafts first, then choose
            found = [(req, self._lookup(req, k)) for req, k in candidates]
            found = [(req, d) for req, d in found if d]
            lengths = self._lengths(out, outputs, [(req, len(d)) for req, d in found])
            for (req, draft), k in zip(found, lengths):
                if k:
                    scheduler.add_draft_tokens(out, req, draft[:k])
            return
        # a draft model: choose how many to propose, take their room, then run the draft
        lengths = self._lengths(out, outputs, candidates)
        chosen = [(req, scheduler.reserve_draft_tokens(out, req, k))
                  for (req, _), k in zip(candidates, lengths) if k]
        chosen = [(req, k) for req, k in chosen if k]
        if not chosen:
            return
        drafts = self.draft.propose([req for req, _ in chosen], [k for _, k in chosen])  # under grammars
        for (req, reserved), draft in zip(chosen, drafts):
            scheduler.set_draft_tokens(out, req, draft, reserved)

    def _lookup(self, req: Request, k: int) -> list[int]:
        draft = req.spec.index.propose(req.token_ids, k)
        if draft and req.matcher is not None:
            draft = draft[:req.matcher.validate_tokens(draft)]
        return draft

    def _lengths(self, out: SchedulerOutput, outputs: int, candidates: list[tuple[Request, int]]) -> list[int]:
        """How many drafts each candidate gets: as many as it can use, or what the policy finds pays."""
        if not self.config.adaptive:
            return [k for _, k in candidates]
        rates = [(req.spec.acceptance.rate(self.prior), k) for req, k in candidates]
        base = sum(out.num_new_tokens.values())
        if self.draft is None:
            return choose(base, outputs, rates, self.cost)
        reqs = [req for req, _ in candidates]
        # a long catch-up is an investment that only drafting in later steps pays back: make it only in a
        # step of decodes alone (next to a prompt chunk, whose cost makes drafts look free, it would be
        # made for drafting that stops in the next step) and for a request that would draft in such a step
        # once caught up (so not where the batch is compute-bound)
        n = len(reqs)
        steady = (choose(outputs, outputs, rates, self.cost, DraftCharge(self.draft.cost, [1] * n, [0.0] * n))
                  if base == outputs else [0] * n)
        rates = [(rate, k if steady[i] or not self.draft.lags_behind(req) else 0)
                 for i, (req, (rate, k)) in enumerate(zip(reqs, rates))]
        return choose(base, outputs, rates, self.cost,
                      self.draft.charge(reqs, rates, [self._remaining(req) for req in reqs]))

    def _remaining(self, req: Request) -> int:
        """The most tokens the request may still produce."""
        left = self.max_model_len - req.num_tokens
        if req.params.max_tokens is not None:
            left = min(left, req.params.max_tokens - req.num_output_tokens)
        return left

    def observe(self, out: SchedulerOutput, result: StepResult, seconds: float) -> None:
        """Learn from a finished step: its cost, and each request's acceptance."""
        self.cost.observe(sum(out.num_new_tokens.values()), seconds)
        if not result.num_drafts:
            return
        s = self.stats
        reqs = {r.request_id: r for r in out.requests}
        for rid, num_drafts in result.num_drafts.items():
            num_accepted = len(result.sampled[rid]) - 1
            s.num_drafts += 1
            s.num_draft_tokens += num_drafts
            s.num_accepted_tokens += num_accepted
            for pos in range(num_accepted):
                s.accepted_per_pos[pos] += 1
            reqs[rid].spec.acceptance.observe(num_drafts, num_accepted)
            tried = num_accepted + (num_accepted < num_drafts)
            self.prior += min(1.0, _PRIOR_DECAY * tried) * (num_accepted / tried - self.prior)
