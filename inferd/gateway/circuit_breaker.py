"""A per-deployment circuit breaker: stop sending traffic to a deployment that keeps failing,
and let exactly one probe through after a cooldown to find out whether it recovered.

States:
- closed: every attempt is allowed; consecutive failures are counted, and reaching
  `failure_threshold` opens the circuit.
- open: nothing is allowed until `cooldown_s` has passed since it opened; then the
  circuit is half-open.
- half_open: exactly one attempt (the probe) is allowed. Its success closes the circuit,
  its failure reopens it with a fresh cooldown, and an attempt that ended without a
  verdict (the client's own error, a cancellation) frees the slot for another probe.

The router asks `allow()` before each attempt on a deployment, skips the deployment when
it says no, and reports every allowed attempt's end with exactly one of
`record_success()`, `record_failure()` (errors that are the deployment's fault: 5xx,
connection errors, timeouts) or `record_released()`. The open -> half_open transition
happens lazily, on the first read after the cooldown; every reader (`state`, `allow()`,
`retry_in()`) applies it first, so they always agree. The clock is injected so tests step
through the whole state machine without sleeping.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def gauge_value(self) -> int:
        """The value exported in a Prometheus gauge: 0 closed, 1 open, 2 half-open."""
        return _GAUGE_VALUES[self]


_GAUGE_VALUES = {CircuitState.CLOSED: 0, CircuitState.OPEN: 1, CircuitState.HALF_OPEN: 2}


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a single half-open probe."""

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be an integer >= 1, got {failure_threshold!r}")
        if not cooldown_s >= 0:
            raise ValueError(f"cooldown_s must be a number of seconds >= 0, got {cooldown_s!r}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> CircuitState:
        self._refresh()
        return self._state

    @property
    def gauge_value(self) -> int:
        return self.state.gauge_value

    @property
    def opened_at(self) -> float | None:
        """Clock time the circuit last opened; None while closed."""
        return self._opened_at

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """Whether an attempt may be sent now; in half-open, True reserves the one probe slot."""
        self._refresh()
        if self._state is CircuitState.CLOSED:
            return True
        if self._state is CircuitState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        # A success is proof the deployment answers, whichever state it arrives in (a slow
        # attempt allowed before the circuit opened may end after it did).
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = None
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._refresh()
        if self._state is CircuitState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()
        elif self._state is CircuitState.HALF_OPEN:
            self._open()
        # Already open: a late failure of an attempt allowed before the circuit opened
        # says nothing new, and must not push the probe further away.

    def record_released(self) -> None:
        """An allowed attempt ended without a verdict on the deployment: free the probe slot."""
        self._probe_in_flight = False

    def retry_in(self) -> float:
        """Seconds until `allow()` may say yes again.

        0 when closed or when a half-open probe slot is free. While a probe is in flight its
        verdict is unknown; the answer is a full cooldown, the wait if the probe fails.
        """
        self._refresh()
        if self._state is CircuitState.OPEN:
            assert self._opened_at is not None
            return max(0.0, self._opened_at + self.cooldown_s - self._clock())
        if self._state is CircuitState.HALF_OPEN and self._probe_in_flight:
            return self.cooldown_s
        return 0.0

    def _open(self) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = self._clock()
        self._probe_in_flight = False

    def _refresh(self) -> None:
        if self._state is CircuitState.OPEN:
            assert self._opened_at is not None
            if self._clock() - self._opened_at >= self.cooldown_s:
                self._state = CircuitState.HALF_OPEN

    def __repr__(self) -> str:
        return (f"CircuitBreaker(state={self._state.value}, failures={self._failures}, "
                f"opened_at={self._opened_at})")
