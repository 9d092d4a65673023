"""Canary traffic: which version a request goes to, how each version is doing, and when a canary must go.

- `Assignment`: a group's stable version and optional canary with its percentage. A
  request with an API key goes to the canary when a hash of (group, canary, key) falls
  in the canary's share, so a key sees one version for the whole rollout, and raising
  the percentage only moves more keys over (none back). A request without a key is
  assigned at random.
- `VersionHealth`: what the requests assigned to one version did since the canary
  started on this server: answered by it or not (a failure even when another version
  then answered in its place), and the times to first token of its streams.
- `judge`: the automatic rollback rule (`CanarySpec`): once the canary has `min_requests`
  outcomes, a verdict when its error rate exceeds the stable version's by more than the
  margin, or its P95 time to first token the stable version's by more than its margin.

Nothing here sleeps or reads a clock; randomness is injected.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass, field

from inferd.gateway.config import CanarySpec


@dataclass(frozen=True)
class Assignment:
    stable: str | None = None        # None: a group without versions (every handle serves)
    canary: str | None = None
    canary_percent: float = 0.0

    def pick(self, group: str, key: str | None, rng: random.Random) -> str | None:
        if self.canary is None or self.canary_percent <= 0:
            return self.stable
        share = _bucket(group, self.canary, key) if key is not None else rng.random()
        return self.canary if share * 100.0 < self.canary_percent else self.stable

    @property
    def serving(self) -> tuple[str, ...]:
        return tuple(v for v in (self.stable, self.canary) if v is not None)


def _bucket(group: str, canary: str, key: str) -> float:
    digest = hashlib.blake2b(f"{group}\0{canary}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


@dataclass
class VersionHealth:
    answered: int = 0
    failed: int = 0
    ttfts: deque = field(default_factory=lambda: deque(maxlen=2048))

    def outcome(self, ok: bool) -> None:
        if ok:
            self.answered += 1
        else:
            self.failed += 1

    @property
    def requests(self) -> int:
        return self.answered + self.failed

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def ttft_p95(self) -> float | None:
        if not self.ttfts:
            return None
        ordered = sorted(self.ttfts)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]

    def to_dict(self) -> dict:
        return {"requests": self.requests, "failed": self.failed, "error_rate": self.error_rate,
                "ttft_p95_s": self.ttft_p95()}


def judge(canary: VersionHealth, stable: VersionHealth, policy: CanarySpec) -> str | None:
    """Why the canary must be rolled back, or None (not yet, or it is doing fine)."""
    if not policy.auto_rollback or canary.requests < policy.min_requests:
        return None
    if canary.error_rate > stable.error_rate + policy.max_error_rate_increase:
        return (f"error rate {canary.error_rate:.1%} over {canary.requests} requests, stable "
                f"{stable.error_rate:.1%} over {stable.requests} (margin {policy.max_error_rate_increase:.1%})")
    if policy.max_ttft_p95_increase is None:
        return None
    if len(canary.ttfts) < policy.min_requests or len(stable.ttfts) < policy.min_requests:
        return None
    c, s = canary.ttft_p95(), stable.ttft_p95()
    if c > s * (1 + policy.max_ttft_p95_increase):
        return (f"P95 time to first token {c * 1000:.0f} ms, stable {s * 1000:.0f} ms "
                f"(margin {policy.max_ttft_p95_increase:.0%})")
    return None
