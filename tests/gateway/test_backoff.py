"""Retry delays, Retry-After parsing and clamping."""

from __future__ import annotations

import random

import pytest

from inferd.gateway.backoff import (RetryPolicy, clamp_retry_after, parse_retry_after, parse_retry_after_ms,
                                    retry_after_from_headers, retry_delay)

# Wed, 21 Oct 2015 07:28:00 GMT
T_2015 = 1445412480.0


@pytest.mark.parametrize("attempt,cap", [(0, 0.25), (1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (9, 8.0)])
def test_full_jitter_stays_within_the_exponential_cap_and_covers_it(attempt, cap):
    policy = RetryPolicy(max_retries=10)
    rng = random.Random(attempt)
    delays = [retry_delay(policy, attempt, None, rng) for _ in range(2000)]
    assert all(0.0 <= d <= cap for d in delays)
    # full jitter: spread over the whole range, not bunched at the cap
    assert min(delays) < 0.02 * cap and max(delays) > 0.98 * cap
    assert sum(delays) / len(delays) == pytest.approx(cap / 2, rel=0.05)


def test_retries_run_out_at_max_retries():
    policy = RetryPolicy(max_retries=2)
    rng = random.Random(0)
    assert retry_delay(policy, 0, None, rng) is not None
    assert retry_delay(policy, 1, None, rng) is not None
    assert retry_delay(policy, 2, None, rng) is None
    assert retry_delay(RetryPolicy(max_retries=0), 0, 1.0, rng) is None
    with pytest.raises(ValueError):
        retry_delay(policy, -1, None, rng)


def test_huge_attempt_numbers_do_not_overflow():
    assert 0 <= retry_delay(RetryPolicy(max_retries=10**6), 5000, None, random.Random(0)) <= 8.0


def test_retry_after_is_honoured_with_a_small_jitter():
    policy = RetryPolicy()
    rng = random.Random(1)
    delays = [retry_delay(policy, 0, 5.0, rng) for _ in range(1000)]
    assert all(5.0 <= d <= 5.5 for d in delays)          # at least the hint; jitter 10% of it
    assert max(delays) - min(delays) > 0.4               # a herd spreads out
    small = [retry_delay(policy, 0, 0.0, rng) for _ in range(1000)]
    assert all(0.0 <= d <= policy.base_s for d in small)  # the jitter is at least base_s wide
    assert retry_delay(policy, 0, -3.0, rng) <= policy.base_s


def test_retry_after_beyond_the_limit_means_move_on():
    policy = RetryPolicy(max_retry_after_s=30.0)
    rng = random.Random(2)
    assert retry_delay(policy, 0, 30.0, rng) >= 30.0
    assert retry_delay(policy, 0, 30.01, rng) is None
    assert retry_delay(policy, 1, 3600.0, rng) is None


def test_retry_delay_is_reproducible_with_the_same_seed():
    policy = RetryPolicy(max_retries=5)
    a = [retry_delay(policy, i % 5, None, random.Random(7)) for i in range(10)]
    b = [retry_delay(policy, i % 5, None, random.Random(7)) for i in range(10)]
    assert a == b


@pytest.mark.parametrize("kwargs", [{"max_retries": -1}, {"max_retries": 1.5}, {"base_s": -0.1},
                                    {"max_s": float("inf")}, {"max_retry_after_s": float("nan")}])
def test_policy_rejects_bad_numbers(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_policy_is_frozen():
    with pytest.raises(AttributeError):
        RetryPolicy().max_retries = 5


@pytest.mark.parametrize("value,expected", [("120", 120.0), (" 3 ", 3.0), ("0", 0.0), ("1.5", 1.5),
                                            (None, None), ("", None), ("soon", None), ("-5", None),
                                            ("inf", None), ("nan", None)])
def test_parse_retry_after_delta_seconds(value, expected):
    assert parse_retry_after(value, now=T_2015) == expected


def test_parse_retry_after_http_date():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=T_2015 - 42) == 42.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=T_2015) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 09:28:00 +0200", now=T_2015 - 1) == 1.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 -0000", now=T_2015 - 7) == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=T_2015 + 100) == 0.0   # in the past
    assert parse_retry_after("Wed, 99 Foo 2015 07:28:00 GMT", now=T_2015) is None


def test_parse_retry_after_ms_and_headers():
    assert parse_retry_after_ms("1500") == 1.5
    assert parse_retry_after_ms("x") is None and parse_retry_after_ms(None) is None
    assert retry_after_from_headers({"Retry-After-Ms": "250", "Retry-After": "9"}) == 0.25
    assert retry_after_from_headers({"retry-after": "9"}) == 9.0
    assert retry_after_from_headers({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=T_2015) == 10.0
    assert retry_after_from_headers({}) is None


@pytest.mark.parametrize("seconds,expected", [(0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (29.5, 30),
                                              (60.0, 60), (3600.0, 60), (float("inf"), 60),
                                              (float("nan"), 60), (-4.0, 1)])
def test_clamp_retry_after(seconds, expected):
    got = clamp_retry_after(seconds)
    assert got == expected and isinstance(got, int)


def test_clamp_retry_after_bounds_are_parameters():
    assert clamp_retry_after(0.1, lower=2, upper=10) == 2
    assert clamp_retry_after(99, lower=2, upper=10) == 10
    with pytest.raises(ValueError):
        clamp_retry_after(5, lower=10, upper=2)
