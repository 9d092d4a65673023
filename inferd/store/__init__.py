"""Open a store by URL: `sqlite:///path/to/file.db` (the default) or `postgresql://user@host/db`."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

from inferd.store.base import Store, Tx
from inferd.store.schema import migrate

__all__ = ["Store", "Tx", "default_store_url", "open_store"]


def default_store_url() -> str:
    """`$INFERD_STORE`, else a SQLite file in the user's data directory."""
    return os.environ.get("INFERD_STORE") or f"sqlite:///{Path(user_data_dir('inferd')) / 'inferd.db'}"


def open_store(url: str | None = None) -> Store:
    """A store at `url` with its schema up to date."""
    url = url or default_store_url()
    if url.startswith("sqlite:///"):
        from inferd.store.sqlite import SQLiteStore
        store: Store = SQLiteStore(url.removeprefix("sqlite:///"))
    elif url.startswith(("postgresql://", "postgres://")):
        from inferd.store.postgres import PostgresStore
        store = PostgresStore(url)
    else:
        raise ValueError(f"unsupported store URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST/DB")
    try:
        store.run_sync(migrate)
    except BaseException:
        store.close()
        raise
    return store
