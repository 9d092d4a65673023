"""When speculation pays: draft lengths per request, chosen each step against the measured step cost.

Speculation trades compute for steps: a request's d drafts cost d more tokens in
the step and are worth, on average, a + a^2 + ... + a^d more output tokens, where a
is that request's acceptance rate. When a step is bound by reading the weights
(one or a few requests on a CPU), extra tokens are almost free and speculation
wins; when it is bound by compute (many requests), extra tokens cost their full
share and rejected ones are pure loss. The policy does not guess which regime it
is in: it measures.

- `StepCost` keeps the mean wall time of a step per number of tokens computed in
  it (an exponential moving average per count, counts above 64 in buckets of
  powers of two). A count not measured yet is interpolated between the measured
  counts around it, or, beyond them, estimated from the nearest by a roofline
  prior: flat up to 16 tokens, proportional above.
- `Acceptance` is one request's acceptance rate: decayed counts of accepted drafts
  over drafts that reached verification (a rejected draft ends its run, so the
  drafts after it are not evidence), with a prior of the rate seen across requests.
- `choose` gives every candidate draft token a value (a^j for a request's j-th
  draft), takes them best first, and keeps the prefix that maximizes expected
  output tokens per second of step: at high batch sizes that prefix is usually
  empty, and speculation switches itself off.
- A draft model's proposals are not free: its forwards are timed by rows in a
  `StepCost` of their own (measured at start for 1 to 64 rows, then by every
  forward), and `choose` adds to the step what the chosen drafts cost it
  (`DraftCharge`): a request's j-th draft is a row of the draft's j-th forward,
  and its first draft also brings its catch-up (the tokens the draft has not seen)
  into the first forward. A long catch-up (the prompt, when a request first
  drafts, or the tokens of a stretch without drafts) is an investment that every
  later draft of the request uses: it is made only in a step of decodes alone,
  for a request that would draft in it once caught up (the speculator asks
  `choose` that first), and charged as its share for one step of the request's
  remaining tokens, so that a request with many tokens to go starts drafting
  where it pays and one near its end does not.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

FLAT_TOKENS = 16     # the prior: a step costs about the same up to this many tokens (weight-bound)
_EXACT = 64          # token counts kept one by one; above, buckets of powers of two
_COST_DECAY = 0.2    # weight of a new step time in its count's average
_ACCEPT_DECAY = 0.8  # weight of the past in a request's acceptance counts


def _bucket(num_tokens: int) -> int:
    return num_tokens if num_tokens <= _EXACT else 1 << (num_tokens - 1).bit_length()


class StepCost:
    """Mean seconds of a step by the number of tokens it computes."""

    def __init__(self):
        self._seconds: dict[int, float] = {}
        self._counts: list[int] = []  # the measured buckets, ascending

    def observe(self, num_tokens: int, seconds: float) -> None:
        b = _bucket(num_tokens)
        old = self._seconds.get(b)
        if old is None:
            bisect.insort(self._counts, b)
            self._seconds[b] = seconds
        else:
            self._seconds[b] = old + _COST_DECAY * (seconds - old)

    def estimate(self, num_tokens: int) -> float | None:
        """Seconds for a step of num_tokens, or None before any step was measured."""
        if not self._seconds:
            return None
        b = _bucket(num_tokens)
        if b in self._seconds:
            return self._seconds[b]
        i = bisect.bisect_left(self._counts, b)
        if 0 < i < len(self._counts):  # between two measured counts: on the line through them
            lo, hi = self._counts[i - 1], self._counts[i]
            return self._seconds[lo] + (self._seconds[hi] - self._seconds[lo]) * (b - lo) / (hi - lo)
        ref = self._counts[i - 1] if i else self._counts[0]  # the nearest measured count below, else above
        return self._seconds[ref] * max(b, FLAT_TOKENS) / max(ref, FLAT_TOKENS)


class Acceptance:
    """A request's draft acceptance rate, from decayed counts and a prior."""

    __slots__ = ("accepted", "tried")

    def __init__(self):
        self.accepted = 0.0
        self.tried = 0.0

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        tried = num_accepted + (1 if num_accepted < num_drafts else 0)
        self.accepted = _ACCEPT_DECAY * self.accepted + num_accepted
        self.tried = _ACCEPT_DECAY * self.tried + tried

    def rate(self, prior: float, prior_weight: float = 1.0) -> float:
        return (self.accepted + prior * prior_weight) / (self.tried + prior_weight)


@dataclass
class DraftCharge:
    """What proposing costs with a draft model, for `choose`: its forwards' seconds by rows, and per
    candidate its rows in the first forward (its catch-up) and the seconds it is charged once if it drafts."""

    cost: StepCost
    first_rows: list[int]
    once: list[float]


def choose(base_tokens: int, base_outputs: int, candidates: list[tuple[float, int]], cost: StepCost,
           draft: DraftCharge | None = None) -> list[int]:
    """Draft lengths for the candidates [(acceptance rate, drafts available)], given a step that computes
    base_tokens and samples base_outputs tokens without drafts: the draft tokens that maximize
    expected output tokens per second of step. With a draft model (`draft`), the step also pays for
    proposing: a request's first draft adds its catch-up rows to the draft's first forward (and its
    one-time charge), its j-th draft one row to the j-th forward, and a forward's first rows pay for the
    whole forward."""
    lengths = [0] * len(candidates)
    base = cost.estimate(base_tokens)
    if base is None:  # the first step: measure it plain
        return lengths
    values = sorted(((rate ** j, i) for i, (rate, n) in enumerate(candidates) for j in range(1, n + 1)),
                    reverse=True)
    expected = float(base_outputs)  # every sampling request emits at least one token
    best_rate, best_count = expected / base, 0
    taken = [0] * len(candidates)  # drafts per request in the prefix so far
    forward_rows: list[int] = []   # rows of each draft forward in the prefix so far
    proposing = 0.0                # the draft model's seconds for the prefix so far
    for count, (value, i) in enumerate(values, 1):
        expected += value
        if draft is not None:
            j = taken[i]
            taken[i] += 1
            if j == len(forward_rows):
                forward_rows.append(0)
            rows = draft.first_rows[i] if j == 0 else 1
            before = forward_rows[j]
            forward_rows[j] += rows
            proposing += _seconds(draft.cost, forward_rows[j]) - _seconds(draft.cost, before)
            if j == 0:
                proposing += draft.once[i]
        seconds = cost.estimate(base_tokens + count) + proposing
        if expected / seconds > best_rate:
            best_rate, best_count = expected / seconds, count
    for _, i in values[:best_count]:
        lengths[i] += 1
    return lengths


def _seconds(cost: StepCost, rows: int) -> float:
    """A draft forward's estimated seconds (0 rows: none)."""
    return (cost.estimate(rows) or 0.0) if rows else 0.0
