"""pytest fixtures for real PostgreSQL and Kafka, shared by every test in the repository.

Loaded automatically in any pytest run of the workspace venv (``pytest11`` entry point of
conveyor-devstack), so ``tests/`` and ``services/*/tests`` see the same fixtures and the same
session-wide servers. Backends start lazily, the first time a test asks for them: unit tests
never start anything.

Session fixtures: ``devstack_postgres`` (a ``PostgresServer``: ``.url``, ``create_database``,
``stop``/``start``), ``devstack_kafka`` / ``kafka_bootstrap`` (``host:port``), ``devstack_kafka_server``
(a ``KafkaServer``: ``stop``/``start``; restart it in a ``finally`` if you stop it),
``conveyor_kafka_topics`` (Conveyor's topics created, ``{name: partitions}``). Module fixture:
``database_url`` (a fresh, empty database per test module). Function fixture: ``make_topic``
(``make_topic(partitions) -> name``, a new uniquely named topic).

When a backend cannot start the fixture FAILS with the reason: integration tests run against real
backends on our machines. ``CONVEYOR_ALLOW_SKIP=1`` turns that into a skip. The terminal summary
ends with ``devstack: postgres=<backend>(<version>) kafka=<backend>(<version>)``.
"""

from __future__ import annotations

import os

# Test processes fork (pexpect's pty, subprocess with pre-exec functions) while gRPC threads are
# busy: gRPC's fork handlers then print epoll errors into the child or abort it. Nothing here needs
# gRPC in a forked child, so its fork support stays off (read once, when grpc is first imported).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
import re
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import psycopg
import pytest

from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka import KafkaServer
from conveyor_devstack.postgres import PostgresServer
from conveyor_devstack.stack import start_kafka, start_postgres
from conveyor_devstack.topics import conveyor_topics, ensure_topics_sync

ALLOW_SKIP_ENV = "CONVEYOR_ALLOW_SKIP"
_USED = pytest.StashKey[dict[str, str]]()
_S = TypeVar("_S", PostgresServer, KafkaServer)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_USED] = {}


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    used = config.stash.get(_USED, {})
    terminalreporter.write_line(
        f"devstack: postgres={used.get('postgres', 'not-used')} "
        f"kafka={used.get('kafka', 'not-used')}"
    )


def _unavailable(kind: str, exc: BaseException) -> NoReturn:
    reason = f"devstack: {kind} could not start: {type(exc).__name__}: {exc}"
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(reason)
    pytest.fail(f"{reason}\n(set {ALLOW_SKIP_ENV}=1 to skip these tests instead)", pytrace=False)


def _start(kind: str, start: Callable[[], _S]) -> _S:
    try:
        return start()
    except (DevstackError, OSError) as exc:
        failure = exc  # fail outside the except block: no chained traceback in the report
    _unavailable(kind, failure)


@pytest.fixture(scope="session")
def devstack_postgres(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """The session's PostgreSQL 15 (fast settings: fsync off)."""
    server = _start("postgres", lambda: start_postgres(fast=True))
    request.config.stash[_USED]["postgres"] = server.label
    try:
        yield server
    finally:
        server.close()


def _database_name(module: str) -> str:
    base = re.sub(r"[^a-z0-9_]+", "_", module.rsplit(".", 1)[-1].lower()).strip("_")
    return f"t_{base[:48]}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def database_url(
    devstack_postgres: PostgresServer, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh, empty database for this test module (dropped afterwards); a libpq URL."""
    name = _database_name(request.module.__name__ if request.module else "session")
    url = devstack_postgres.create_database(name)
    try:
        yield url
    finally:
        try:
            devstack_postgres.drop_database(name)
        except psycopg.OperationalError as exc:  # a test left the server stopped
            warnings.warn(f"devstack: could not drop database {name}: {exc}", stacklevel=1)


@pytest.fixture(scope="session")
def devstack_kafka_server(request: pytest.FixtureRequest) -> Iterator[KafkaServer]:
    """The session's Kafka broker handle (``stop``/``start`` on the local backend)."""
    server = _start("kafka", start_kafka)
    request.config.stash[_USED]["kafka"] = server.label
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def devstack_kafka(devstack_kafka_server: KafkaServer) -> str:
    """The session's Kafka bootstrap, ``host:port``."""
    return devstack_kafka_server.bootstrap


@pytest.fixture(scope="session")
def kafka_bootstrap(devstack_kafka: str) -> str:
    """The session's Kafka bootstrap, ``host:port`` (alias of ``devstack_kafka``)."""
    return devstack_kafka


@pytest.fixture(scope="session")
def conveyor_kafka_topics(devstack_kafka: str) -> dict[str, int]:
    """Conveyor's topics, created on the session broker; ``{name: partitions}``."""
    topics = conveyor_topics()
    ensure_topics_sync(devstack_kafka, topics)
    return topics


@pytest.fixture
def make_topic(devstack_kafka: str, request: pytest.FixtureRequest) -> Callable[[int], str]:
    """``make_topic(partitions)`` creates a new topic named after the test and returns its name."""
    stem = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name)[:80].strip("-.")

    def make(partitions: int = 1) -> str:
        name = f"test.{stem}.{uuid.uuid4().hex[:8]}"
        ensure_topics_sync(devstack_kafka, {name: partitions})
        return name

    return make
