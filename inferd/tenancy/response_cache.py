"""An exact-match response cache in the store, shared by every replica.

A request is answered from the cache when the caller asked for it, by the
`x-inferd-cache-ttl: SECONDS` header on the request or the `cache_ttl` of its
key (a header of 0 turns it off for one request), and an answer to the same
request is there and younger than that. Same request means the same endpoint,
the same team, and the same body after dropping what does not change the
answer (stream options, `user`); entries are keyed by a SHA-256 of that.
Only whole (non-streamed) answers are cached. A hit is metered like any
request, with its usage and a cost of zero, and says so in `x-inferd-cache: hit`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable

from inferd.store.base import Store
from inferd.wire.request import InferenceRequest

_SWEEP_CHANCE = 0.01  # one write in a hundred also clears expired entries


def cache_key(request: InferenceRequest) -> str:
    canonical = json.dumps([request.team, request.endpoint, request.cache_identity()], sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def requested_ttl(header: str | None, key_ttl: float | None) -> float | None:
    """The TTL a request asks for: its header, else its key's; None: do not cache. ValueError if malformed."""
    if header is None:
        return key_ttl
    try:
        ttl = float(header)
    except ValueError:
        raise ValueError(f"x-inferd-cache-ttl must be a number of seconds, not {header!r}") from None
    if not ttl >= 0:
        raise ValueError("x-inferd-cache-ttl must be >= 0")
    return ttl or None


class ResponseCache:
    def __init__(self, store: Store, clock: Callable[[], float]):
        self.store, self.clock = store, clock

    async def lookup(self, key: str, ttl: float) -> dict | None:
        """The cached answer if one was stored less than `ttl` seconds ago and has not expired."""
        now = self.clock()
        row = await self.store.run(lambda tx: tx.fetchone(
            "SELECT body FROM response_cache WHERE key = ? AND expires > ? AND created > ?", (key, now, now - ttl)))
        return None if row is None else json.loads(row[0])

    async def save(self, key: str, answer: dict, ttl: float) -> None:
        now = self.clock()
        body = json.dumps(answer, separators=(",", ":"))
        sweep = random.random() < _SWEEP_CHANCE

        def write(tx):
            tx.execute("INSERT INTO response_cache (key, body, created, expires) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (key) DO UPDATE SET body = excluded.body, created = excluded.created, "
                       "expires = excluded.expires", (key, body, now, now + ttl))
            if sweep:
                tx.execute("DELETE FROM response_cache WHERE expires <= ?", (now,))

        await self.store.run(write)
