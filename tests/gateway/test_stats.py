"""Deployment stats and the load predictor, on a scripted timeline."""

from __future__ import annotations

import asyncio

import pytest

from inferd.gateway.stats import DeploymentStats, Ewma, LoadPredictor, Outcome


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_ewma_first_sample_then_smoothing():
    e = Ewma(0.5)
    assert e.value is None
    assert e.update(1.0) == 1.0
    assert e.update(3.0) == 2.0
    assert e.update(2.0) == 2.0
    assert Ewma(1.0).update(7.0) == 7.0
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            Ewma(bad)


def test_in_flight_counts_and_outcomes():
    s = DeploymentStats()
    assert s.in_flight == 0 and s.ttft_ewma is None
    assert s.started() == 0
    assert s.started() == 1
    assert s.in_flight == 2
    s.finished()
    s.finished(Outcome.FAILURE)
    assert s.in_flight == 0
    assert s.counts == {Outcome.SUCCESS: 1, Outcome.FAILURE: 1, Outcome.CLIENT_ERROR: 0, Outcome.CANCELLED: 0}
    with pytest.raises(RuntimeError):
        s.finished()
    s.counts[Outcome.SUCCESS] = 99                  # a copy: the stats are untouched
    assert s.counts[Outcome.SUCCESS] == 1


def test_track_sets_the_outcome_from_how_the_block_ended():
    s = DeploymentStats()
    with s.track() as attempt:
        assert s.in_flight == 1 and attempt.in_flight_at_start == 0
    with pytest.raises(KeyError), s.track():
        raise KeyError("boom")
    with pytest.raises(asyncio.CancelledError), s.track():
        raise asyncio.CancelledError()
    with pytest.raises(ValueError), s.track() as attempt:
        attempt.outcome = Outcome.CLIENT_ERROR       # explicit beats the exception's default
        raise ValueError("bad request")
    assert s.in_flight == 0
    assert s.counts == {Outcome.SUCCESS: 1, Outcome.FAILURE: 1, Outcome.CLIENT_ERROR: 1, Outcome.CANCELLED: 1}


def test_ttft_ewma():
    s = DeploymentStats(ttft_alpha=0.25)
    s.observe_ttft(0.4)
    assert s.ttft_ewma == 0.4
    s.observe_ttft(0.8)
    assert s.ttft_ewma == pytest.approx(0.5)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            s.observe_ttft(bad)


def test_predictor_with_no_data_is_optimistic_and_finite():
    p = LoadPredictor(capacity=2, clock=FakeClock())
    assert p.drain_rate() is None and p.unloaded_ttft is None
    assert p.predict_ttft(0) == 0.0
    assert p.predict_ttft(50) == 0.0
    assert p.retry_after(1) == 0.0                   # a slot is free
    assert p.retry_after(50) == 1.0                  # cold_retry_s


def test_predictor_scripted_timeline():
    clock = FakeClock()
    p = LoadPredictor(capacity=2, window_s=10.0, ttft_alpha=0.5, clock=clock)
    p.observe_ttft(0.5, in_flight_at_start=0)
    p.observe_ttft(3.0, in_flight_at_start=2)        # it queued: not an unloaded sample
    p.observe_ttft(0.7, in_flight_at_start=1)
    assert p.unloaded_ttft == pytest.approx(0.6)
    assert p.predict_ttft(2) == pytest.approx(0.6)   # nothing completed yet: no queueing predicted

    for t in (1.0, 2.0, 3.0, 4.0):
        clock.t = t
        p.record_completion()
    assert p.drain_rate() == pytest.approx(1.0)      # 4 completions over the 4 s watched
    assert p.predict_ttft(0) == pytest.approx(0.6)
    assert p.predict_ttft(1) == pytest.approx(0.6)   # the last free slot
    assert p.predict_ttft(2) == pytest.approx(1.6)   # first in line: one completion away
    assert p.predict_ttft(4) == pytest.approx(3.6)
    assert p.queue_position(4) == 3
    assert p.retry_after(1) == 0.0
    assert p.retry_after(4) == pytest.approx(3.0)

    clock.t = 12.0                                   # window (2, 12]: completions at 3 and 4
    assert p.drain_rate() == pytest.approx(0.2)
    assert p.retry_after(2) == pytest.approx(5.0)
    assert p.predict_ttft(3) == pytest.approx(10.6)

    clock.t = 20.0                                   # window empty: bounded by 16 s of silence
    assert p.drain_rate() == pytest.approx(1 / 16)
    assert p.retry_after(3) == pytest.approx(32.0)

    p.record_completion()
    assert p.drain_rate() == pytest.approx(0.1)      # one in the full 10 s window


def test_first_burst_does_not_read_as_an_infinite_rate():
    clock = FakeClock(100.0)
    p = LoadPredictor(capacity=1, window_s=30.0, clock=clock)
    clock.t = 100.25
    for _ in range(3):
        p.record_completion()
    assert p.drain_rate() == pytest.approx(3.0)      # over the one-second floor, not 0.25 s
    assert p.retry_after(1) == pytest.approx(1 / 3)


def test_stats_feed_an_attached_predictor():
    clock = FakeClock()
    p = LoadPredictor(capacity=1, window_s=10.0, ttft_alpha=1.0, clock=clock)
    s = DeploymentStats(predictor=p)
    first = s.started()
    second = s.started()
    clock.t = 2.0
    s.observe_ttft(0.3, in_flight_at_start=first)
    s.observe_ttft(1.3, in_flight_at_start=second)   # waited for the only slot
    s.observe_ttft(9.0)                              # no start count: the predictor is not fed
    assert p.unloaded_ttft == 0.3
    s.finished(Outcome.FAILURE)                      # failures do not count as drained work
    assert p.drain_rate() is None
    s.finished()
    assert p.drain_rate() == pytest.approx(0.5)      # one success in 2 s


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"capacity": 1, "window_s": 0},
                                    {"capacity": 1, "cold_retry_s": -1}])
def test_predictor_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        LoadPredictor(**kwargs)
