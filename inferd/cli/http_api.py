"""The commands that work through a running server (`inferd batch`, `inferd models`): its URL, the key,
and one call that turns an HTTP error into the server's own message.

The server and key come from `--base-url` / `--api-key` or `$INFERD_BASE_URL` / `$INFERD_API_KEY`.
"""

from __future__ import annotations

import argparse
import os

import httpx


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="the server (default: $INFERD_BASE_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="the key to call it with (default: $INFERD_API_KEY)")


class Api:
    def __init__(self, args: argparse.Namespace, timeout: float = 120.0):
        base = args.base_url or os.environ.get("INFERD_BASE_URL") or "http://127.0.0.1:8000"
        key = args.api_key or os.environ.get("INFERD_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=base.rstrip("/"), headers=headers, timeout=timeout)

    def call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ValueError(f"cannot reach {self.http.base_url}: {e}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise ValueError(f"{method} {path}: {r.status_code}: {message}")
        return r
