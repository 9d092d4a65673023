"""The tables, created or upgraded when a store is opened.

`MIGRATIONS` is append-only: each entry is one schema version, a list of
statements valid on both SQLite and PostgreSQL. `migrate` applies the versions a
database has not seen yet, under a lock, so two replicas starting at once do
not both apply them. Money is USD as DOUBLE PRECISION, times are Unix seconds.
Rate-limit and budget scopes are strings: `key:<key id>` or `team:<team name>`.
"""

from __future__ import annotations

from inferd.store.base import Tx

_LIMIT_COLUMNS = """
    budget_usd DOUBLE PRECISION,
    budget_period TEXT,
    rpm INTEGER,
    tpm INTEGER,
    max_parallel INTEGER"""

MIGRATIONS: list[list[str]] = [
    [
        f"""CREATE TABLE teams (
            name TEXT PRIMARY KEY,{_LIMIT_COLUMNS},
            created DOUBLE PRECISION NOT NULL)""",
        f"""CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            name TEXT,
            team TEXT NOT NULL,
            is_admin INTEGER NOT NULL DEFAULT 0,{_LIMIT_COLUMNS},
            cache_ttl DOUBLE PRECISION,
            created DOUBLE PRECISION NOT NULL,
            revoked DOUBLE PRECISION)""",
        "CREATE INDEX api_keys_team ON api_keys (team)",
        # token buckets for requests and tokens per minute
        """CREATE TABLE rate_buckets (
            scope TEXT NOT NULL,
            kind TEXT NOT NULL,
            level DOUBLE PRECISION NOT NULL,
            updated DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (scope, kind))""",
        # requests admitted and not yet settled: their count is the parallelism, their
        # reservations hold budget; rows of a crashed replica expire
        """CREATE TABLE tickets (
            id TEXT PRIMARY KEY,
            key_scope TEXT,
            team_scope TEXT,
            reserved_usd DOUBLE PRECISION NOT NULL,
            reserved_tokens INTEGER NOT NULL,
            created DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX tickets_key ON tickets (key_scope)",
        "CREATE INDEX tickets_team ON tickets (team_scope)",
        """CREATE TABLE spend (
            scope TEXT NOT NULL,
            period TEXT NOT NULL,
            spent_usd DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (scope, period))""",
        # one row per metered request
        """CREATE TABLE ledger (
            id TEXT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            request_id TEXT,
            key_id TEXT,
            team TEXT,
            endpoint TEXT NOT NULL,
            model TEXT,
            served_model TEXT,
            deployment TEXT,
            prompt_tokens INTEGER NOT NULL,
            cached_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cost_usd DOUBLE PRECISION NOT NULL,
            latency_s DOUBLE PRECISION,
            ttft_s DOUBLE PRECISION,
            status INTEGER NOT NULL,
            stream INTEGER NOT NULL,
            cancelled INTEGER NOT NULL,
            fallback_from TEXT,
            degraded_from TEXT,
            cache_hit INTEGER NOT NULL,
            usage_estimated INTEGER NOT NULL,
            batch_id TEXT)""",
        "CREATE INDEX ledger_ts ON ledger (ts)",
        "CREATE INDEX ledger_team_ts ON ledger (team, ts)",
        """CREATE TABLE response_cache (
            key TEXT PRIMARY KEY,
            body TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            expires DOUBLE PRECISION NOT NULL)""",
    ],
    [
        # uploaded files (batch input) and files inferd writes (batch output and errors)
        """CREATE TABLE files (
            id TEXT PRIMARY KEY,
            team TEXT,
            key_id TEXT,
            purpose TEXT NOT NULL,
            filename TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            content TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            deleted DOUBLE PRECISION)""",
        "CREATE INDEX files_team ON files (team, created)",
        """CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            team TEXT,
            key_id TEXT,
            endpoint TEXT NOT NULL,
            input_file_id TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            metadata TEXT,
            status TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            in_progress_at DOUBLE PRECISION,
            finalizing_at DOUBLE PRECISION,
            completed_at DOUBLE PRECISION,
            failed_at DOUBLE PRECISION,
            expired_at DOUBLE PRECISION,
            cancelling_at DOUBLE PRECISION,
            cancelled_at DOUBLE PRECISION,
            output_file_id TEXT,
            error_file_id TEXT,
            errors TEXT,
            total INTEGER NOT NULL,
            completed INTEGER NOT NULL,
            failed INTEGER NOT NULL)""",
        "CREATE INDEX batches_team ON batches (team, created)",
        "CREATE INDEX batches_status ON batches (status)",
        # one row per input line; a line is claimed with a lease, and its result, its state and its
        # ledger row are written in one transaction, so a line is answered and billed exactly once
        """CREATE TABLE batch_lines (
            batch_id TEXT NOT NULL,
            line INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            body TEXT NOT NULL,
            state TEXT NOT NULL,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION,
            attempts INTEGER NOT NULL,
            status_code INTEGER,
            result TEXT,
            PRIMARY KEY (batch_id, line))""",
        "CREATE INDEX batch_lines_state ON batch_lines (batch_id, state)",
    ],
    [
        # completion tokens a reasoning model spent thinking (part of completion_tokens)
        "ALTER TABLE ledger ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0",
    ],
    [
        # rows a tensor model scored in an infer call (what it is priced by)
        "ALTER TABLE ledger ADD COLUMN predictions INTEGER NOT NULL DEFAULT 0",
    ],
    [
        # model versions (gateway/version_store.py): each an immutable deployment spec of a group
        """CREATE TABLE model_versions (
            model TEXT NOT NULL,
            label TEXT NOT NULL,
            spec_hash TEXT NOT NULL,
            spec TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (model, label))""",
        "CREATE UNIQUE INDEX model_versions_hash ON model_versions (model, spec_hash)",
        # what each group serves now; `generation` grows with every change, so replicas see one at a glance
        """CREATE TABLE model_rollouts (
            model TEXT PRIMARY KEY,
            stable TEXT NOT NULL,
            canary TEXT,
            canary_percent DOUBLE PRECISION NOT NULL,
            config_hash TEXT,
            generation INTEGER NOT NULL,
            updated DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE model_version_events (
            id TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            action TEXT NOT NULL,
            label TEXT,
            previous TEXT,
            canary_percent DOUBLE PRECISION,
            reason TEXT)""",
        "CREATE INDEX model_version_events_model ON model_version_events (model, ts)",
        # the version that answered a request
        "ALTER TABLE ledger ADD COLUMN model_version TEXT",
        # the versions a batch started with, per model group (JSON): its lines stay on them
        "ALTER TABLE batches ADD COLUMN pinned_versions TEXT",
    ],
]


def migrate(tx: Tx) -> int:
    """Bring the schema up to date; returns the version now in place."""
    tx.lock("inferd-schema")
    tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    current = tx.scalar("SELECT MAX(version) FROM schema_version") or 0
    for version, statements in enumerate(MIGRATIONS[current:], start=current + 1):
        for sql in statements:
            tx.execute(sql)
        tx.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    return len(MIGRATIONS)
