"""Live load and latency figures per deployment, which routing strategies and admission read.

- `DeploymentStats`: one per deployment. Requests in flight (`started()` / `finished()`,
  or the `track()` context manager), an exponentially weighted moving average of time to
  first token, and request counts by `Outcome`. Strategies order candidates by these; the
  metrics layer exports them.
- `LoadPredictor`: for a deployment with a known number of concurrent slots (a local
  engine's max running sequences). It predicts the time to first token a new request would
  see and how long until a slot frees, so the router can degrade (route to a smaller
  model, or answer 429/503 with `Retry-After`) before the queue does the damage.
  Attach one to a `DeploymentStats` and it is fed by the same calls.

Everything takes its clock by injection; nothing here sleeps, spawns or locks (the gateway
runs on one event loop).
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class Outcome(str, enum.Enum):
    """How one attempt on a deployment ended (a metrics label, hence str)."""

    SUCCESS = "success"
    FAILURE = "failure"            # the deployment's fault: counts against it
    CLIENT_ERROR = "client_error"  # the request's own fault: says nothing about the deployment
    CANCELLED = "cancelled"        # the client went away first


class Ewma:
    """Exponentially weighted moving average; the first sample is taken as is."""

    def __init__(self, alpha: float):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.value: float | None = None

    def update(self, sample: float) -> float:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)
        return self.value


class LoadPredictor:
    """Queueing model of one engine with `capacity` concurrent slots.

    Model: a request that finds a free slot (fewer than `capacity` in flight) starts at
    once, and its time to first token is the unloaded TTFT: prefill plus overhead, kept as
    an EWMA of the samples of such requests only. A request that finds all slots taken
    waits in a FIFO queue; with `in_flight` requests already in flight it is number
    `in_flight - capacity + 1` in line, and slots free at the drain rate, so

        predict_ttft(in_flight) = unloaded                                 if in_flight < capacity
                                = (in_flight - capacity + 1) / drain_rate + unloaded   otherwise

    The drain rate is the number of successful completions in the last `window_s` seconds
    divided by the span watched (at most `window_s`, at least one second, so the first
    burst of completions does not read as an infinite rate). Failures and cancellations are
    not counted: they end without doing the work and would overstate the rate. If no request
    completed within the window, the rate is bounded by the silence instead, one per
    seconds since the last completion, so a stalled engine looks ever slower rather than
    unknown. The rate measures what the engine did: under light load that is less than it
    could do, but the prediction only uses it when the queue is not empty, when the engine
    is saturated and the two agree.

    With no data yet the model is optimistic: no completion seen means no queueing delay
    is predicted, and no unloaded sample means an unloaded TTFT of 0. `retry_after()` is the
    queueing part alone: the expected seconds until a slot frees for a new request, finite
    even with no data (`cold_retry_s`).
    """

    _MIN_SPAN_S = 1.0

    def __init__(self, capacity: int, *, window_s: float = 30.0, ttft_alpha: float = 0.2,
                 cold_retry_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s!r}")
        if not cold_retry_s >= 0:
            raise ValueError(f"cold_retry_s must be >= 0 seconds, got {cold_retry_s!r}")
        self.capacity = capacity
        self.window_s = window_s
        self.cold_retry_s = cold_retry_s
        self._clock = clock
        self._since = clock()
        self._completions: deque[float] = deque()
        self._last_completion: float | None = None
        self._unloaded_ttft = Ewma(ttft_alpha)

    @property
    def unloaded_ttft(self) -> float | None:
        return self._unloaded_ttft.value

    def record_completion(self) -> None:
        """A request completed successfully and freed its slot."""
        now = self._clock()
        self._completions.append(now)
        self._last_completion = now
        self._expire(now)

    def observe_ttft(self, seconds: float, in_flight_at_start: int) -> None:
        """A request's time to first token; `in_flight_at_start` others were in flight when it started."""
        if in_flight_at_start < self.capacity:   # it found a free slot: no queueing inside
            self._unloaded_ttft.update(seconds)

    def drain_rate(self) -> float | None:
        """Completions per second, or None before the first completion."""
        if self._last_completion is None:
            return None
        now = self._clock()
        self._expire(now)
        if self._completions:
            span = max(min(self.window_s, now - self._since), self._MIN_SPAN_S)
            return len(self._completions) / span
        return 1.0 / (now - self._last_completion)   # > window_s > 0, as the window is empty

    def queue_position(self, in_flight: int) -> int:
        """Requests that must complete before a new one gets a slot (0 if one is free)."""
        return max(0, in_flight - self.capacity + 1)

    def retry_after(self, in_flight: int) -> float:
        """Expected seconds until a slot frees for a new request, with `in_flight` in flight."""
        queued = self.queue_position(in_flight)
        if queued == 0:
            return 0.0
        rate = self.drain_rate()
        return self.cold_retry_s if rate is None else queued / rate

    def predict_ttft(self, in_flight: int) -> float:
        """Expected time to first token of a request arriving with `in_flight` in flight."""
        unloaded = self.unloaded_ttft or 0.0
        queued = self.queue_position(in_flight)
        rate = self.drain_rate() if queued else None
        return unloaded if rate is None else queued / rate + unloaded

    def _expire(self, now: float) -> None:
        while self._completions and self._completions[0] <= now - self.window_s:
            self._completions.popleft()


@dataclass
class Attempt:
    """One tracked attempt: set `outcome` before the block ends unless it is a plain success."""

    in_flight_at_start: int
    outcome: Outcome | None = None


class DeploymentStats:
    """In-flight count, TTFT EWMA and outcome counts of one deployment."""

    def __init__(self, *, ttft_alpha: float = 0.2, predictor: LoadPredictor | None = None):
        self.predictor = predictor
        self._ttft = Ewma(ttft_alpha)
        self._in_flight = 0
        self._counts = {outcome: 0 for outcome in Outcome}

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def ttft_ewma(self) -> float | None:
        """Smoothed time to first token in seconds; None until the first observation."""
        return self._ttft.value

    @property
    def counts(self) -> dict[Outcome, int]:
        """Finished attempts by outcome (a copy)."""
        return dict(self._counts)

    def started(self) -> int:
        """An attempt was sent; returns how many were already in flight (for `observe_ttft`)."""
        before = self._in_flight
        self._in_flight += 1
        return before

    def finished(self, outcome: Outcome = Outcome.SUCCESS) -> None:
        if self._in_flight == 0:
            raise RuntimeError("finished() called more often than started()")
        self._in_flight -= 1
        self._counts[outcome] += 1
        if outcome is Outcome.SUCCESS and self.predictor is not None:
            self.predictor.record_completion()

    def observe_ttft(self, seconds: float, in_flight_at_start: int | None = None) -> None:
        """Record a time to first token; pass what `started()` returned to feed the predictor."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"a time to first token is a finite number of seconds >= 0, got {seconds!r}")
        self._ttft.update(seconds)
        if self.predictor is not None and in_flight_at_start is not None:
            self.predictor.observe_ttft(seconds, in_flight_at_start)

    @contextmanager
    def track(self) -> Iterator[Attempt]:
        """`started()` on entry, `finished()` on exit with the attempt's outcome.

        An outcome left unset is SUCCESS on a normal exit, CANCELLED on cancellation and
        FAILURE on any other exception; set it explicitly where the error was the client's.
        """
        attempt = Attempt(self.started())
        try:
            yield attempt
        except (asyncio.CancelledError, GeneratorExit):
            attempt.outcome = attempt.outcome or Outcome.CANCELLED
            raise
        except BaseException:
            attempt.outcome = attempt.outcome or Outcome.FAILURE
            raise
        finally:
            self.finished(attempt.outcome or Outcome.SUCCESS)
