"""Who is calling: the API key on every route but the probes (/health, /metrics, /version and the Open
Inference Protocol's /v2/health/live and /v2/health/ready) and the web app's static files (`/` and
`/ui/...`: they hold no data; the page asks for a key and sends it with its API calls), resolved to a
`Principal`.

Keys come as `Authorization: Bearer <key>` (or `x-api-key`). The admin key given
at start-up (`--api-key` / `INFERD_API_KEY`) is an admin principal of its own;
every other key is looked up by its hash in the store. Lookups are cached for
`ttl_s` seconds (a revoked key stops working within that time on every replica;
at once on the replica that revoked it), unknown keys included, so a flood of
bad keys does not become a flood of queries.

A server with no admin key and no live key in its store is open, as before
keys existed: any key or none is accepted, requests carry no principal and are
metered without one; its /admin routes are closed (no page a browser visits can
mint a key), unless the server was started with `--allow-open-admin`, and then
only for clients on loopback. Once a key exists, every request but the probes
needs one (the tokenizer routes included); /admin needs an admin key.
Secrets never appear in errors or logs.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

from starlette.datastructures import Headers

from inferd.store.base import Store
from inferd.tenancy import keys
from inferd.tenancy.keys import Principal
from inferd.wire.errors import http_error

ADMIN = Principal(key_id="admin", team=None, is_admin=True)
_CACHE_LIMIT = 10_000
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def presented_key(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        token = headers.get("x-api-key", "")
    return token.strip() or None


class Authenticator:
    def __init__(self, store: Store, admin_key: str | None = None, ttl_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, allow_open_admin: bool = False):
        self.store, self.ttl_s, self.clock = store, ttl_s, clock
        self.allow_open_admin = allow_open_admin
        self._admin_key = admin_key.encode() if admin_key else None
        self._principals: dict[str, tuple[Principal | None, float]] = {}
        self._open: tuple[bool, float] | None = None

    # the only routes anyone may call: load balancers, scrapers and probes send no key
    PUBLIC_PATHS = frozenset({"/health", "/metrics", "/version", "/v2/health/live", "/v2/health/ready", "/"})
    # the web app's files: a browser loads them before it has a key to send
    PUBLIC_PREFIX = "/ui/"

    def protects(self, path: str) -> bool:
        """One rule for every route: all need a key (when keys exist) but the public ones."""
        return path not in self.PUBLIC_PATHS and not path.startswith(self.PUBLIC_PREFIX)

    async def principal(self, path: str, headers: Headers, client_host: str | None = None) -> Principal | None:
        """The caller of a protected path; None on an open server; InferdError 401/403 otherwise."""
        token = presented_key(headers)
        if self._admin_key is not None and token is not None and hmac.compare_digest(token.encode(),
                                                                                     self._admin_key):
            who = ADMIN
        else:
            who = None if token is None else await self._lookup(token)
        if who is None:
            # an open server takes any key or none, as clients that must send one send "EMPTY"
            if self._admin_key is None and await self._is_open():
                return self._open_admin(client_host) if path.startswith("/admin") else None
            if token is None:
                raise http_error(401, "this server needs an API key; send it as 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
            raise http_error(401, "the API key is not valid (unknown or revoked)", code="invalid_api_key")
        if path.startswith("/admin") and not who.is_admin:
            raise http_error(403, "this endpoint needs an admin key", code="admin_key_required")
        return who

    def _open_admin(self, client_host: str | None) -> Principal:
        if not self.allow_open_admin:
            raise http_error(403, "this server has no keys, so its admin API is closed; create a key with "
                             "`inferd keys create`, start it with --api-key, or with --allow-open-admin",
                             code="admin_closed")
        if client_host not in _LOOPBACK:
            raise http_error(403, "the admin API of a server without keys answers loopback clients only",
                             code="admin_closed")
        return ADMIN

    def forget(self) -> None:
        """Drop cached lookups (after a key was created or revoked here)."""
        self._principals.clear()
        self._open = None

    async def _is_open(self) -> bool:
        now = self.clock()
        if self._open is None or self._open[1] <= now:
            has = await self.store.run(keys.has_keys)
            self._open = (not has, now + self.ttl_s)
        return self._open[0]

    async def _lookup(self, token: str) -> Principal | None:
        digest = keys.hash_key(token)
        now = self.clock()
        cached = self._principals.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        who = await self.store.run(lambda tx: keys.find_principal(tx, digest))
        if len(self._principals) >= _CACHE_LIMIT:
            self._principals.clear()
        self._principals[digest] = (who, now + self.ttl_s)
        return who
