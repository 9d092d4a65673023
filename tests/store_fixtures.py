"""Store fixtures: every test that takes `store` or `store_url` runs on SQLite and on PostgreSQL.

PostgreSQL is a real server, started once per test session from the local
server binaries (Debian's `postgresql` package; scripts/install.sh installs it)
in a temporary directory, listening only on 127.0.0.1 with trust
authentication, and removed at the end. Each test gets a database of its own,
dropped after it, so tests never see each other's rows.

Without the binaries the PostgreSQL cases are skipped, unless
INFERD_REQUIRE_POSTGRES is set (CI sets it): then they fail, so a broken install
cannot pass as a green run that tested only SQLite.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferd.store import Store, open_store

_SUPERUSER = "postgres"


def _missing(reason: str) -> None:
    if os.environ.get("INFERD_REQUIRE_POSTGRES"):
        pytest.fail(f"{reason} (INFERD_REQUIRE_POSTGRES is set)", pytrace=False)
    pytest.skip(reason)


def _find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl, else the ones on PATH."""

    def version(bindir: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", Path(bindir).parent.name))

    candidates = [
        d for d in glob.glob("/usr/lib/postgresql/*/bin")
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK)
    ]
    if candidates:
        return Path(max(candidates, key=version))
    # other systems (Homebrew, Postgres.app) put them on PATH
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def _free_port() -> int:
    # a port free now; another process could take it before the server binds it,
    # which pg_ctl then reports as a failed start
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway PostgreSQL cluster in its own directory."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        # PostgreSQL refuses to run as root: as root, the cluster belongs to the
        # `postgres` system user (Debian's package creates it) and every server binary
        # runs as that user, so the directory must be one it can reach: not under a
        # root-only pytest temp dir
        self.root = Path(tempfile.mkdtemp(prefix="inferd-pg-", dir="/tmp" if self.as_root else None))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._names = itertools.count(1)
        self._started = False

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", _SUPERUSER, "--", *cmd]
        # cwd: the server binaries look up their own location from the working
        # directory, which as root may be one the postgres user cannot enter
        proc = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n{log}"
            )

    def start(self) -> None:
        self.sockets.mkdir()
        if self.as_root:
            try:
                user = pwd.getpwnam(_SUPERUSER)
            except KeyError:
                raise RuntimeError(f"running as root needs a {_SUPERUSER!r} system user to run PostgreSQL as") from None
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", _SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
        )
        # this file belongs to the postgres user when running as root; root may still append to it
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# inferd test server\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.sockets}'\n"
                # the cluster is thrown away after the session: durability only costs time
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 200\n"
            )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self._started = True

    def stop(self) -> None:
        try:
            if self._started:
                try:
                    self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
                except RuntimeError:
                    self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        # CREATE and DROP DATABASE cannot run inside a transaction
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"inferd_test_{next(self._names)}_{uuid.uuid4().hex[:8]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        # FORCE: a test that left a store open must not keep its database alive
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _find_bindir()
    if bindir is None:
        _missing(
            "PostgreSQL server binaries not found (no initdb/pg_ctl in /usr/lib/postgresql/*/bin or on PATH): "
            "apt-get install postgresql, or run scripts/install.sh"
        )
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed: pip install 'inferd[postgres]'")
    server = PostgresServer(bindir)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> Iterator[str]:
    """The URL of a fresh, empty store on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'inferd.db'}"
        return
    # requested here, not as an argument, so that the SQLite cases neither start
    # PostgreSQL nor skip with it
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.new_database()
    yield url
    server.drop_database(url)


@pytest.fixture
def store(store_url) -> Iterator[Store]:
    """An open, migrated store on each backend."""
    s = open_store(store_url)
    yield s
    s.close()
