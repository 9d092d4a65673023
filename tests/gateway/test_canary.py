"""The canary rules exactly: sticky assignment by key, and when a canary is judged worse than stable."""

from __future__ import annotations

import random

from inferd.gateway.canary import Assignment, VersionHealth, judge
from inferd.gateway.config import CanarySpec

KEYS = [f"key_{i}" for i in range(2000)]


def share(a: Assignment) -> set[str]:
    return {k for k in KEYS if a.pick("chat", k, random.Random(0)) == a.canary}


def test_assignment_is_sticky_per_key_and_raising_the_share_only_adds_keys():
    ten, fifty = Assignment("v1", "v2", 10), Assignment("v1", "v2", 50)
    assert share(ten) == share(Assignment("v1", "v2", 10))
    assert share(ten) <= share(fifty)
    assert 150 < len(share(ten)) < 250 and 900 < len(share(fifty)) < 1100
    assert share(Assignment("v1", "v2", 100)) == set(KEYS) and not share(Assignment("v1", "v2", 0))
    assert Assignment("v1").pick("chat", "key_1", random.Random(0)) == "v1"


def test_requests_without_a_key_are_assigned_at_random():
    rng = random.Random(7)
    picks = [Assignment("v1", "v2", 30).pick("chat", None, rng) for _ in range(1000)]
    assert 230 < picks.count("v2") < 370


def health(failed: int, answered: int, ttfts: list[float] = ()) -> VersionHealth:
    h = VersionHealth(answered=answered, failed=failed)
    h.ttfts.extend(ttfts)
    return h


POLICY = CanarySpec(min_requests=10, max_error_rate_increase=0.1, max_ttft_p95_increase=0.5)


def test_a_canary_is_judged_only_after_min_requests():
    assert judge(health(9, 0), health(0, 100), POLICY) is None
    assert "error rate" in judge(health(10, 0), health(0, 100), POLICY)


def test_the_error_rate_margin_is_over_the_stable_rate():
    assert judge(health(2, 8), health(1, 9), POLICY) is None          # 20% vs 10%: within 10 points
    assert judge(health(3, 7), health(1, 9), POLICY) is not None      # 30% vs 10%


def test_the_ttft_margin_is_relative_to_the_stable_p95():
    fast, slow = [0.1] * 20, [0.2] * 20
    assert judge(health(0, 20, [0.14] * 20), health(0, 20, fast), POLICY) is None
    assert "P95 time to first token" in judge(health(0, 20, slow), health(0, 20, fast), POLICY)
    assert judge(health(0, 20, slow), health(0, 20, fast[:5]), POLICY) is None  # too few stable samples
    assert judge(health(10, 0), health(0, 10), CanarySpec(auto_rollback=False)) is None
