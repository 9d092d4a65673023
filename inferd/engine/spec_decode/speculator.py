"""Drafts into the step, acceptance and step cost out of it, and the speculative-decoding metrics.

`EngineCore.step` calls `extend` after the scheduler has made the step: every
scheduled request whose tokens reach the end of what it knows (a decode, or the
last chunk of a prompt) gets a draft from its prompt-lookup index, cut to what its
grammar accepts and to what max_tokens and the context leave; `policy.choose`
(or, with `adaptive` off, the config) says how many of those drafts each request
computes, and the scheduler adds them while the budget and the free blocks allow.
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
from inferd.engine.spec_decode.ngram import NgramIndex
from inferd.engine.spec_decode.policy import Acceptance, StepCost, choose

_PRIOR_DECAY = 0.05  # weight of one request's verification in the acceptance rate seen across requests


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
        self.index = NgramIndex(config.prompt_lookup_min, config.prompt_lookup_max)
        self.acceptance = Acceptance()


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.cost = StepCost()
        self.prior = 0.5  # acceptance rate across requests, the prior of a new request's
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
        candidates: list[tuple[Request, list[int]]] = []
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
            draft = req.spec.index.propose(req.token_ids, k)
            if draft and req.matcher is not None:
                draft = draft[:req.matcher.validate_tokens(draft)]
            if draft:
                candidates.append((req, draft))
        if not candidates:
            return
        if self.config.adaptive:
            rates = [(req.spec.acceptance.rate(self.prior), len(draft)) for req, draft in candidates]
            lengths = choose(sum(out.num_new_tokens.values()), outputs, rates, self.cost)
        else:
            lengths = [len(draft) for _, draft in candidates]
        for (req, draft), k in zip(candidates, lengths):
            if k:
                scheduler.add_draft_tokens(out, req, draft[:k])

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
