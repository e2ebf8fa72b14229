"""Which PostgreSQL and Kafka to use, in this order, decided here and nowhere else:

1. the environment: ``CONVEYOR_TEST_DATABASE_URL`` (libpq or SQLAlchemy URL) and
   ``CONVEYOR_TEST_KAFKA_BOOTSTRAP`` (``host:port``), used as they are;
2. testcontainers, when a Docker engine answers (``postgres:15-alpine``; Confluent's cp-kafka 8.1
   image, which is Apache Kafka 4.1, in KRaft mode);
3. local processes: PostgreSQL 15 from the machine's server binaries, Apache Kafka from the
   Maven-resolved jars on the machine's Java 17.

``CONVEYOR_DEVSTACK_BACKEND=local`` skips the Docker probe, ``=testcontainers`` makes it mandatory.
In auto mode, a Docker engine that answers but cannot give a container (an image that cannot be
pulled, a container that does not start) is logged as a warning and the local process is used.
Every start logs which backend was chosen.

A Kafka with a SASL_SSL listener (``start_kafka_async(security="SASL_SSL")``,
``Devstack.start(kafka_security="SASL_SSL")``) is always a local process (SCRAM users and a throwaway
CA made at start); the environment and testcontainers tiers give PLAINTEXT brokers only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from conveyor_devstack import kafka_install
from conveyor_devstack.backends import (
    _kafka_from_env_async,
    _kafka_from_testcontainers,
    _postgres_from_env,
    _postgres_from_testcontainers,
)
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka import KafkaServer, ListenerSecurity, LocalKafka
from conveyor_devstack.postgres import LocalPostgres, PostgresServer
from conveyor_devstack.topics import ensure_topics, ensure_topics_sync

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Tier 1: the environment


# --------------------------------------------------------------------------------------------------
# Tier 2: testcontainers


# --------------------------------------------------------------------------------------------------
# Tier 3: local processes, and the public start functions


def _local_postgres_server(local: LocalPostgres, started: float) -> PostgresServer:
    server = PostgresServer(url=local.url, backend="local-process", local=local)
    log.info(
        "devstack: postgres=%s on 127.0.0.1:%s ready in %.1fs%s",
        server.label,
        local.port,
        time.monotonic() - started,
        " (fast: fsync off)" if local.fast else "",
    )
    return server


def start_postgres(
    *, fast: bool = False, settings: Mapping[str, str] | None = None
) -> PostgresServer:
    """A PostgreSQL (env, testcontainers or a local process) with a ``conveyor`` database.

    ``fast`` (local only) turns fsync and full_page_writes off: for tests, never
    for benchmarks. Call from a long-lived thread; ``close()`` it when done.
    """
    started = time.monotonic()
    server = _postgres_from_env() or _postgres_from_testcontainers()
    if server is not None:
        return server
    local = LocalPostgres(fast=fast, settings=settings)
    try:
        local.start()
    except BaseException:
        local.close()
        raise
    return _local_postgres_server(local, started)


async def start_postgres_async(
    *, fast: bool = False, settings: Mapping[str, str] | None = None
) -> PostgresServer:
    """``start_postgres`` for async callers; the server process is spawned in the loop thread."""
    started = time.monotonic()
    server = await asyncio.to_thread(_postgres_from_env)
    if server is None:
        server = await asyncio.to_thread(_postgres_from_testcontainers)
    if server is not None:
        return server
    local = LocalPostgres(fast=fast, settings=settings)
    try:
        await local.start_async()
    except BaseException:
        await asyncio.to_thread(local.close)
        raise
    return _local_postgres_server(local, started)


def _local_kafka_server(local: LocalKafka, started: float) -> KafkaServer:
    server = KafkaServer(
        bootstrap=local.bootstrap,
        backend="local-process",
        version=local.version or "?",
        local=local,
        security=local.client_security,
        password_file=local.password_file,
    )
    log.info(
        "devstack: kafka=%s on %s (%s) ready in %.1fs",
        server.label,
        server.bootstrap,
        server.security.describe(),
        time.monotonic() - started,
    )
    return server


async def start_kafka_async(
    *, settings: Mapping[str, str] | None = None, security: ListenerSecurity = "PLAINTEXT"
) -> KafkaServer:
    """An Apache Kafka broker (env, testcontainers or a local KRaft process).

    ``security="SASL_SSL"``: a local process with a SASL_SSL listener (see the module docstring).
    The broker process is spawned in the loop thread; ``close()`` it when done.
    """
    started = time.monotonic()
    if security == "PLAINTEXT":
        server = await _kafka_from_env_async()
        if server is None:
            server = await asyncio.to_thread(_kafka_from_testcontainers)
        if server is not None:
            return server
    local = LocalKafka(settings=settings, security=security)
    try:
        await local.start_async()
    except BaseException:
        await asyncio.to_thread(local.close)
        raise
    return _local_kafka_server(local, started)


def start_kafka(
    *, settings: Mapping[str, str] | None = None, security: ListenerSecurity = "PLAINTEXT"
) -> KafkaServer:
    """``start_kafka_async`` for synchronous callers; call from a long-lived thread."""
    started = time.monotonic()
    if security == "PLAINTEXT":
        server = (
            kafka_install.run_coroutine_sync(_kafka_from_env_async) or _kafka_from_testcontainers()
        )
        if server is not None:
            return server
    local = LocalKafka(settings=settings, security=security)
    try:
        local.start()
    except BaseException:
        local.close()
        raise
    return _local_kafka_server(local, started)


# --------------------------------------------------------------------------------------------------
# Both at once


class Devstack:
    """PostgreSQL and/or Kafka started together.

    ``async with Devstack.start() as ds:`` or ``with Devstack.start() as ds:``, then
    ``ds.database_url`` and ``ds.kafka_bootstrap``. ``topics={name: partitions}`` creates topics
    once the broker is up (``conveyor_devstack.conveyor_topics()`` for Conveyor's own).
    """

    def __init__(self, postgres: PostgresServer | None, kafka: KafkaServer | None) -> None:
        self.postgres = postgres
        self.kafka = kafka

    @classmethod
    def start(
        cls,
        *,
        postgres: bool = True,
        kafka: bool = True,
        fast: bool = False,
        topics: Mapping[str, int] | None = None,
        kafka_security: ListenerSecurity = "PLAINTEXT",
    ) -> DevstackStarter:
        """A context manager (sync or async) that starts the requested backends
        (``kafka_security="SASL_SSL"``: a local broker with a SASL_SSL listener)."""
        return DevstackStarter(
            postgres=postgres, kafka=kafka, fast=fast, topics=topics, kafka_security=kafka_security
        )

    @property
    def database_url(self) -> str:
        """``postgresql://...`` of the ``conveyor`` database."""
        if self.postgres is None:
            raise DevstackError("this devstack was started without PostgreSQL")
        return self.postgres.url

    @property
    def kafka_bootstrap(self) -> str:
        """``host:port`` of the broker."""
        if self.kafka is None:
            raise DevstackError("this devstack was started without Kafka")
        return self.kafka.bootstrap

    def describe(self) -> dict[str, Any]:
        """URLs and backends, as the CLI prints them."""
        out: dict[str, Any] = {}
        if self.postgres is not None:
            out["database_url"] = self.postgres.url
            out["postgres"] = {
                "backend": self.postgres.backend,
                "version": self.postgres.short_version,
            }
        if self.kafka is not None:
            out["kafka_bootstrap"] = self.kafka.bootstrap
            out["kafka"] = {"backend": self.kafka.backend, "version": self.kafka.version}
            security = self.kafka.security
            if security.protocol != "PLAINTEXT":
                out["kafka_security"] = {
                    "protocol": security.protocol,
                    "sasl_mechanism": security.sasl_mechanism,
                    "sasl_username": security.sasl_username,
                    "sasl_password_file": str(self.kafka.password_file or ""),
                    "ssl_cafile": security.ssl_cafile,
                }
        return out

    def close(self) -> None:
        """Stop what was started (Kafka first, then PostgreSQL)."""
        try:
            if self.kafka is not None:
                self.kafka.close()
        finally:
            if self.postgres is not None:
                self.postgres.close()


class DevstackStarter:
    """Returned by ``Devstack.start``: use with ``with`` or ``async with``."""

    def __init__(
        self,
        *,
        postgres: bool,
        kafka: bool,
        fast: bool,
        topics: Mapping[str, int] | None,
        kafka_security: ListenerSecurity = "PLAINTEXT",
    ) -> None:
        self._postgres = postgres
        self._kafka = kafka
        self._kafka_security: ListenerSecurity = kafka_security
        self._fast = fast
        self._topics = dict(topics or {})
        self._stack: Devstack | None = None

    def start_sync(self) -> Devstack:
        """Start the backends one after the other (from a long-lived thread)."""
        stack = Devstack(None, None)
        try:
            if self._postgres:
                stack.postgres = start_postgres(fast=self._fast)
            if self._kafka:
                stack.kafka = start_kafka(security=self._kafka_security)
                ensure_topics_sync(
                    stack.kafka.bootstrap, self._topics, security=stack.kafka.security
                )
        except BaseException:
            stack.close()
            raise
        return stack

    async def start_async(self) -> Devstack:
        """Start the backends concurrently."""

        async def nothing() -> None:
            return None

        results = await asyncio.gather(
            start_postgres_async(fast=self._fast) if self._postgres else nothing(),
            start_kafka_async(security=self._kafka_security) if self._kafka else nothing(),
            return_exceptions=True,
        )
        pg, kafka = results
        stack = Devstack(
            pg if isinstance(pg, PostgresServer) else None,
            kafka if isinstance(kafka, KafkaServer) else None,
        )
        try:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            if stack.kafka is not None:
                await ensure_topics(
                    stack.kafka.bootstrap, self._topics, security=stack.kafka.security
                )
        except BaseException:
            await asyncio.to_thread(stack.close)
            raise
        return stack

    def __enter__(self) -> Devstack:
        self._stack = self.start_sync()
        return self._stack

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    async def __aenter__(self) -> Devstack:
        self._stack = await self.start_async()
        return self._stack

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            await asyncio.to_thread(self._stack.close)
            self._stack = None
