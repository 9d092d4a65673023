"""How long to wait before retrying a deployment, and the `Retry-After` header both ways.

- `RetryPolicy` (frozen, validated) holds the numbers: retries per deployment, the
  exponential backoff base and cap, and the longest upstream `Retry-After` worth waiting for.
- `retry_delay()` is the router's one question after a retryable failure: how long to sleep
  before the next attempt on the same deployment, or None for "do not retry it, move on to
  the next deployment or fallback". Without an upstream hint it is exponential backoff with
  full jitter, uniform(0, min(max_s, base_s * 2**attempt)), so clients that failed together
  do not come back together. With a hint it waits at least that long, plus a little jitter
  for the same reason, unless the hint is longer than `max_retry_after_s`: then waiting
  would hold the client hostage, and another deployment is the better bet.
- `parse_retry_after()` / `parse_retry_after_ms()` / `retry_after_from_headers()` read an
  upstream's hint (delta-seconds or an HTTP-date; `retry-after-ms` as OpenAI sends it).
- `clamp_retry_after()` turns a computed wait into the value of the `Retry-After` header the
  gateway sends its own clients: whole seconds, within what clients honour.

Randomness and time are injected so tests are exact.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime

# Beyond 2**62 the float product overflows long before it matters; the cap is max_s anyway.
_MAX_EXPONENT = 62


@dataclass(frozen=True)
class RetryPolicy:
    """Retry numbers for one deployment; seconds throughout."""

    max_retries: int = 2              # retries on the same deployment after its first attempt
    base_s: float = 0.25              # backoff cap of the first retry; doubles on each next one
    max_s: float = 8.0                # backoff cap, whatever the attempt
    max_retry_after_s: float = 30.0   # a longer upstream Retry-After means: move on instead
    retry_after_jitter: float = 0.1   # extra wait on a Retry-After, as a fraction of it (at least base_s)

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        for name in ("base_s", "max_s", "max_retry_after_s", "retry_after_jitter"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def retry_delay(policy: RetryPolicy, attempt: int, retry_after: float | None,
                rng: random.Random) -> float | None:
    """Seconds to wait before retry number `attempt` (0 for the first retry) on one deployment.

    None means do not retry this deployment: its retries are used up, or the upstream asked
    for a longer wait than `policy.max_retry_after_s`.
    """
    if attempt < 0:
        raise ValueError(f"attempt counts retries from 0, got {attempt}")
    if attempt >= policy.max_retries:
        return None
    if retry_after is not None:
        if retry_after > policy.max_retry_after_s:
            return None
        wait = max(0.0, retry_after)
        # A herd told "retry in 5 s" must not all arrive at 5.000 s.
        return wait + rng.uniform(0.0, max(policy.base_s, policy.retry_after_jitter * wait))
    cap = min(policy.max_s, policy.base_s * 2 ** min(attempt, _MAX_EXPONENT))
    return rng.uniform(0.0, cap)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header value, or None when absent or unreadable.

    Accepts delta-seconds (fractions too, as some servers send them) and HTTP-dates, read
    against `now` (a Unix time, default the current time); a date in the past means 0.
    """
    if value is None or not value.strip():
        return None
    seconds = _non_negative_float(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:   # "-0000" means UTC with no zone claimed (RFC 5322)
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def parse_retry_after_ms(value: str | None) -> float | None:
    """Seconds from a `retry-after-ms` header value (milliseconds), or None."""
    if value is None:
        return None
    ms = _non_negative_float(value)
    return None if ms is None else ms / 1000.0


def retry_after_from_headers(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """An upstream's wait hint from its response headers: `retry-after-ms`, else `retry-after`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = parse_retry_after_ms(lowered.get("retry-after-ms"))
    return ms if ms is not None else parse_retry_after(lowered.get("retry-after"), now)


def clamp_retry_after(seconds: float, lower: int = 1, upper: int = 60) -> int:
    """The `Retry-After` header value (whole seconds) for a computed wait.

    Rounded up, so a client never comes back early; at least `lower`, because 0 invites an
    immediate retry storm; at most `upper`, because clients give up on (or ignore) long waits.
    """
    if not 0 <= lower <= upper:
        raise ValueError(f"need 0 <= lower <= upper, got lower={lower}, upper={upper}")
    if math.isnan(seconds):
        return upper
    if seconds >= upper:
        return upper
    return max(lower, math.ceil(seconds))


def _non_negative_float(value: str) -> float | None:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None
