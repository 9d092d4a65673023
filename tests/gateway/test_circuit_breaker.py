"""The circuit breaker's state machine, stepped with a fake clock."""

from __future__ import annotations

import pytest

from inferd.gateway.circuit_breaker import CircuitBreaker, CircuitState


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _open_breaker(clock, threshold=3, cooldown=10.0):
    b = CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown, clock=clock)
    for _ in range(threshold):
        b.record_failure()
    assert b.state is CircuitState.OPEN
    return b


def test_opens_after_threshold_consecutive_failures_only():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=3, cooldown_s=10.0, clock=clock)
    b.record_failure()
    b.record_failure()
    b.record_success()                     # breaks the run: the count starts again
    assert b.consecutive_failures == 0
    b.record_failure()
    b.record_failure()
    assert b.state is CircuitState.CLOSED and b.allow()
    assert b.opened_at is None
    b.record_failure()
    assert b.state is CircuitState.OPEN
    assert b.opened_at == 1000.0
    assert not b.allow()


def test_open_refuses_until_cooldown_then_allows_exactly_one_probe():
    clock = FakeClock()
    b = _open_breaker(clock)
    clock.t += 9.999
    assert not b.allow()
    assert b.state is CircuitState.OPEN
    assert b.retry_in() == pytest.approx(0.001)
    clock.t += 0.001
    assert b.state is CircuitState.HALF_OPEN     # the lazy transition, seen by every reader
    assert b.retry_in() == 0.0
    assert b.allow()                             # the probe
    assert not b.allow()                         # ... and only one
    assert not b.allow()
    assert b.state is CircuitState.HALF_OPEN
    assert b.retry_in() == 10.0                  # probe pending: a full cooldown if it fails


def test_probe_success_closes_and_resets():
    clock = FakeClock()
    b = _open_breaker(clock)
    clock.t += 10
    assert b.allow()
    b.record_success()
    assert b.state is CircuitState.CLOSED
    assert b.opened_at is None and b.consecutive_failures == 0
    assert b.allow() and b.allow()
    b.record_failure()
    b.record_failure()
    assert b.state is CircuitState.CLOSED        # a fresh count, not a leftover one


def test_probe_failure_reopens_at_once_with_a_fresh_cooldown():
    clock = FakeClock()
    b = _open_breaker(clock)
    clock.t += 15
    assert b.allow()
    b.record_failure()                           # a single failure in half-open is enough
    assert b.state is CircuitState.OPEN
    assert b.opened_at == 1015.0
    assert not b.allow()
    clock.t += 9
    assert not b.allow()
    clock.t += 1
    assert b.allow()
    assert not b.allow()


def test_release_frees_the_probe_slot_without_changing_state():
    clock = FakeClock()
    b = _open_breaker(clock)
    clock.t += 10
    assert b.allow()
    b.record_released()                          # e.g. the client's own 400, or it hung up
    assert b.state is CircuitState.HALF_OPEN
    assert b.opened_at == 1000.0
    assert b.allow()                             # another probe may go
    assert not b.allow()
    b.record_success()
    assert b.state is CircuitState.CLOSED


def test_release_in_closed_and_open_states_changes_nothing():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=2, cooldown_s=5, clock=clock)
    b.record_failure()
    b.record_released()
    assert b.consecutive_failures == 1 and b.state is CircuitState.CLOSED
    b.record_failure()
    b.record_released()
    assert b.state is CircuitState.OPEN and not b.allow()


def test_late_failure_while_open_does_not_push_the_probe_back():
    clock = FakeClock()
    b = _open_breaker(clock)
    clock.t += 5
    b.record_failure()                           # an attempt allowed before it opened
    assert b.opened_at == 1000.0
    clock.t += 5
    assert b.allow()


def test_gauge_values_and_retry_in():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=30, clock=clock)
    assert b.gauge_value == 0 and b.retry_in() == 0.0
    b.record_failure()
    assert b.gauge_value == 1
    clock.t += 12
    assert b.retry_in() == 18.0
    clock.t += 18
    assert b.gauge_value == 2
    assert [s.gauge_value for s in CircuitState] == [0, 1, 2]


def test_zero_cooldown_goes_straight_to_half_open():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=0, clock=clock)
    b.record_failure()
    assert b.state is CircuitState.HALF_OPEN
    assert b.allow() and not b.allow()


@pytest.mark.parametrize("kwargs", [{"failure_threshold": 0}, {"cooldown_s": -1}, {"cooldown_s": float("nan")}])
def test_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)
