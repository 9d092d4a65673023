"""The autoscaler's rule with a fake clock: sized for capacity + queue, sustained before it moves, bounded."""

from __future__ import annotations

import pytest

from inferd.gateway.autoscale import Autoscaler, Load


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scaler(clock, lo=1, hi=4, target_queue=2, up=5.0, down=60.0) -> Autoscaler:
    return Autoscaler(lo, hi, target_queue, up, down, clock=clock)


def test_wanted_is_in_flight_over_capacity_plus_queue_rounded_up_within_bounds():
    a = scaler(Clock())
    assert a.wanted(Load(1, 0, 8)) == 1            # never under min_replicas
    assert a.wanted(Load(1, 10, 8)) == 1           # 10 <= 8 + 2
    assert a.wanted(Load(1, 11, 8)) == 2
    assert a.wanted(Load(1, 31, 8)) == 4
    assert a.wanted(Load(1, 500, 8)) == 4          # never over max_replicas


def test_scaling_up_waits_for_the_upscale_delay_without_a_break():
    clock = Clock()
    a = scaler(clock, up=5.0)
    busy, calm = Load(1, 25, 8), Load(1, 3, 8)
    assert a.decide(busy).desired == 1
    clock.now = 3.0
    assert a.decide(calm).desired == 1             # a break: the wait starts again
    clock.now = 4.0
    assert a.decide(busy).desired == 1
    clock.now = 8.9
    assert not a.decide(busy).changes
    clock.now = 9.0
    d = a.decide(busy)
    assert d.changes and d.desired == 3 and d.in_flight == 25 and "need 3" in d.reason


def test_scaling_down_waits_for_the_downscale_delay_then_goes_to_what_is_wanted():
    clock = Clock()
    a = scaler(clock, down=60.0)
    idle = Load(4, 0, 8)
    assert not a.decide(idle).changes
    clock.now = 59.0
    assert not a.decide(idle).changes
    clock.now = 60.0
    assert a.decide(idle).desired == 1


def test_moved_bounds_are_followed_at_once_and_bad_ones_refused():
    clock = Clock()
    a = scaler(clock)
    a.set_bounds(2, 3)
    assert a.decide(Load(1, 0, 8)).desired == 2
    assert a.decide(Load(4, 100, 8)).desired == 3
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        a.set_bounds(3, 2)
    with pytest.raises(ValueError):
        Autoscaler(0, 2, 1, 0, 0)
