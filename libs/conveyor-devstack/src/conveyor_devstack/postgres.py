"""PostgreSQL for tests, ``make run`` and benchmarks.

``LocalPostgres`` runs a throwaway cluster from the machine's server binaries (Debian's
``/usr/lib/postgresql/15/bin``): ``initdb`` into an instance directory, then ``postgres`` itself as a
child process (not daemonized by ``pg_ctl``, so it dies with us), listening only on 127.0.0.1 on a free
port, its unix socket inside the instance directory, trust auth. As root it runs as the ``postgres``
system user. ``PostgresServer`` is what callers hold, whatever the backend: the URL of the
``conveyor`` database plus admin helpers (fresh databases per test module, templates) and, for the
local backend, ``stop``/``start`` for kill and restart tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from conveyor_devstack import _process
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.pg_binaries import PgBinaries, find_pg_binaries

log = logging.getLogger(__name__)


DEFAULT_DATABASE = "conveyor"
StopMode = Literal["smart", "fast", "immediate"]

_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}

FAST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
}
"""Settings that trade crash safety of the *machine* for speed (tests only; benchmarks keep the
durable defaults).

``synchronous_commit`` deliberately stays ``on``: with fsync off a commit costs one write() (measured
0.07 ms vs 0.04 ms with it off), and it keeps every acknowledged commit across ``stop("immediate")``
and a SIGKILLed server, which kill/restart tests rely on (with it off the last ~600 ms of commits
are lost on a crash).
"""


# --------------------------------------------------------------------------------------------------
# URLs


def libpq_url(url: str) -> str:
    """``url`` without a SQLAlchemy driver suffix (``postgresql+psycopg://`` -> ``postgresql://``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme == "postgres":
        scheme = "postgresql"
    if scheme != "postgresql":
        raise DevstackError(f"not a PostgreSQL URL: {redact(url)}")
    return urlunsplit(parts._replace(scheme=scheme))


def sqlalchemy_url(url: str, driver: str = "psycopg") -> str:
    """``url`` with a SQLAlchemy driver: ``postgresql+psycopg://...`` (or ``+asyncpg`` ...)."""
    return urlunsplit(urlsplit(libpq_url(url))._replace(scheme=f"postgresql+{driver}"))


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------------------------------
# The handle callers hold


class PostgresServer(_process.ServerHandle["LocalPostgres", StopMode]):
    """A reachable PostgreSQL server and its ``conveyor`` database, whatever started it.

    ``backend`` is ``env``, ``testcontainers`` or ``local-process``. ``stop``/``start`` work only for
    ``local-process`` (``can_restart``).
    """

    kind = "PostgreSQL"

    def __init__(
        self,
        *,
        url: str,
        backend: str,
        local: LocalPostgres | None = None,
        closer: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(backend, local, closer)
        self.url = libpq_url(url)
        self._version: str | None = None

    def __repr__(self) -> str:
        return f"PostgresServer(backend={self.backend!r}, url={redact(self.url)!r})"

    @property
    def version(self) -> str:
        """``server_version`` as reported by the server, e.g. ``15.14 (Debian 15.14-0+deb12u1)``."""
        if self._version is None:
            with self.connect() as conn:
                row = conn.execute("SHOW server_version").fetchone()
            self._version = str(row[0]) if row else "?"
        return self._version

    @property
    def short_version(self) -> str:
        """``15.14``."""
        return self.version.split()[0]

    @property
    def label(self) -> str:
        """``local-process(15.14)``: what the test summary prints."""
        return f"{self.backend}({self.short_version})"

    def url_for(self, database: str) -> str:
        """The URL of another database on this server."""
        return with_database(self.url, database)

    def sqlalchemy_url(self, driver: str = "psycopg", database: str | None = None) -> str:
        """The URL with a SQLAlchemy driver, e.g. ``postgresql+psycopg://``."""
        return sqlalchemy_url(self.url_for(database) if database else self.url, driver)

    def connect(self, database: str | None = None) -> psycopg.Connection[tuple[object, ...]]:
        """A new autocommit connection (default: the ``conveyor`` database)."""
        target = self.url_for(database) if database else self.url
        return psycopg.connect(target, autocommit=True, connect_timeout=10)

    def create_database(
        self, name: str, *, template: str | None = None, replace: bool = False
    ) -> str:
        """Create database ``name`` (optionally ``TEMPLATE template``) and return its URL.

        A template must have no open connections while it is copied.
        """
        with self.connect("postgres") as conn:
            if replace:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template is not None:
                stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
            conn.execute(stmt)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting its sessions."""
        with self.connect("postgres") as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (``smart``/``fast``/``immediate`` as ``pg_ctl -m``); local only."""
        self._stop(mode)

    async def stop_async(self, mode: StopMode = "fast") -> None:
        """``stop`` without blocking the event loop."""
        await self._stop_async(mode)


# --------------------------------------------------------------------------------------------------
# Local process


class LocalPostgres:
    """A PostgreSQL cluster in a temporary directory, run as a child process.

    Lifecycle: ``prepare()`` (initdb, config; any thread) -> ``spawn()`` (from a long-lived thread)
    -> ``wait_ready()``; or just ``start()``. ``stop(mode)`` and ``start()`` again keep the data
    and the port. ``close()`` stops it and deletes the directory.
    """

    def __init__(
        self,
        *,
        fast: bool = False,
        settings: Mapping[str, str] | None = None,
        database: str = DEFAULT_DATABASE,
        ready_timeout: float = 60.0,
    ) -> None:
        self.fast = fast
        self.settings = dict(settings or {})
        self.database = database
        self.ready_timeout = ready_timeout
        self.binaries: PgBinaries | None = None
        self.port: int | None = None
        self.root: Path | None = None
        self._run_as: _process.RunAs | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._database_created = False

    # paths
    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._root / "data"

    @property
    def socket_dir(self) -> Path:
        """Where the unix socket lives."""
        return self._root / "sock"

    @property
    def log_path(self) -> Path:
        """The server's log (stdout and stderr)."""
        return self._root / "postgres.log"

    @property
    def _root(self) -> Path:
        if self.root is None:
            raise DevstackError("LocalPostgres.prepare() has not run")
        return self.root

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/conveyor``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def running(self) -> bool:
        """Whether the postmaster process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _env(self) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
            "LANG": "C",
            "TZ": "UTC",
        }
        if self._run_as is not None:
            env["HOME"] = self._run_as.home
            env["USER"] = env["LOGNAME"] = self._run_as.name
        return env

    def _config(self) -> dict[str, str]:
        config = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "300",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            "dynamic_shared_memory_type": "posix",
        }
        if self.fast:
            config.update(FAST_SETTINGS)
        config.update({k: str(v) for k, v in self.settings.items()})
        return config

    def prepare(self) -> None:
        """Find the binaries, create the instance directory, initdb, write the config."""
        started = time.monotonic()
        self.binaries = find_pg_binaries()
        self._run_as = _process.unprivileged_user("postgres")
        self.root = _process.instance_dir("pg")
        self.port = _process.free_ports(1)[0]
        self.socket_dir.mkdir()
        if self._run_as is not None:
            for path in (self.root, self.socket_dir):
                os.chown(path, self._run_as.uid, self._run_as.gid)
        _process.run(
            [
                str(self.binaries.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            what="initdb",
            cwd=self.root,
            env=self._env(),
            timeout=120,
            run_as=self._run_as,
        )
        lines = [f"{key} = {value}" for key, value in self._config().items()]
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# conveyor devstack\n" + "\n".join(lines) + "\n")
        log.info(
            "devstack: initdb PostgreSQL %s in %s (%.1fs)",
            self.binaries.version,
            self.data_dir,
            time.monotonic() - started,
        )

    def spawn(self) -> None:
        """Start the postmaster (call from a long-lived thread, see ``_process``)."""
        if self.running:
            return
        if self.binaries is None:
            raise DevstackError("LocalPostgres.prepare() has not run")
        self._proc = _process.spawn(
            [
                str(self.binaries.bindir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
            ],
            log_path=self.log_path,
            cwd=self._root,
            env=self._env(),
            run_as=self._run_as,
        )
        _REGISTRY.add(self)

    def wait_ready(self) -> None:
        """Block until the server accepts connections; create the database the first time."""
        deadline = _process.monotonic_deadline(self.ready_timeout)
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise DevstackError(
                    f"postgres exited (code {code}) before accepting connections; "
                    f"log {self.log_path}:\n{_process.tail_file(self.log_path)}"
                )
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=2) as conn:
                    if not self._database_created:
                        conn.execute(
                            sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database))
                        )
                        self._database_created = True
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise DevstackError(
                        f"postgres did not accept connections on 127.0.0.1:{self.port} within "
                        f"{self.ready_timeout:.0f}s ({exc}); log {self.log_path}:\n"
                        f"{_process.tail_file(self.log_path)}"
                    ) from None
            time.sleep(0.05)

    def _first_start_clash(self, exc: BaseException, attempt: int) -> bool:
        """On the first start only, move to another port when ours was taken meanwhile."""
        if self._database_created or not _process.port_clash(exc):
            return False
        if attempt + 1 >= _process.FIRST_START_ATTEMPTS:
            return False
        old, self.port = self.port, _process.free_ports(1)[0]
        self.stop("immediate")
        _process.set_aside(self.log_path)
        log.warning("devstack: postgres port %s was taken meanwhile; using %s", old, self.port)
        return True

    def start(self) -> None:
        """Prepare (first time only), spawn and wait until ready; restarts keep the port."""
        if self.root is None:
            self.prepare()
        for attempt in range(_process.FIRST_START_ATTEMPTS):
            self.spawn()
            try:
                self.wait_ready()
                return
            except DevstackError as exc:
                if not self._first_start_clash(exc, attempt):
                    raise

    async def start_async(self) -> None:
        """``start`` for async callers: blocking steps in threads, the spawn in the loop thread."""
        if self.root is None:
            await asyncio.to_thread(self.prepare)
        for attempt in range(_process.FIRST_START_ATTEMPTS):
            self.spawn()
            try:
                await asyncio.to_thread(self.wait_ready)
                return
            except DevstackError as exc:
                if not self._first_start_clash(exc, attempt):
                    raise

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server: ``smart`` (SIGTERM), ``fast`` (SIGINT) or ``immediate`` (SIGQUIT)."""
        proc = self._proc
        if proc is None:
            return
        _process.stop_process(proc, _STOP_SIGNALS[mode], timeout=30, what="postgres")
        self._proc = None

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop("fast")
        _REGISTRY.discard(self)
        if self.root is not None:
            _process.remove_instance_dir(self.root)
            self.root = None


_REGISTRY: set[LocalPostgres] = set()


def close_all() -> None:
    """Stop every local cluster still running (registered with atexit by the package)."""
    for local in list(_REGISTRY):
        local.close()
