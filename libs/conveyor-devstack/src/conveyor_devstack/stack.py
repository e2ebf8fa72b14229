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
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from conveyor_devstack import kafka as _kafka
from conveyor_devstack import postgres as _pg
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka import KafkaServer, ListenerSecurity, LocalKafka
from conveyor_devstack.postgres import LocalPostgres, PostgresServer
from conveyor_devstack.topics import ensure_topics, ensure_topics_sync

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "CONVEYOR_TEST_DATABASE_URL"
KAFKA_BOOTSTRAP_ENV = "CONVEYOR_TEST_KAFKA_BOOTSTRAP"
BACKEND_ENV = "CONVEYOR_DEVSTACK_BACKEND"
POSTGRES_IMAGE_ENV = "CONVEYOR_DEVSTACK_POSTGRES_IMAGE"
KAFKA_IMAGE_ENV = "CONVEYOR_DEVSTACK_KAFKA_IMAGE"
POSTGRES_IMAGE = "postgres:15-alpine"
KAFKA_IMAGE = "confluentinc/cp-kafka:8.1.0"
"""Confluent Platform 8.1 ships Apache Kafka 4.1; testcontainers' KafkaContainer drives CP images."""

BackendMode = Literal["auto", "testcontainers", "local"]
_T = TypeVar("_T")


def backend_mode() -> BackendMode:
    """``CONVEYOR_DEVSTACK_BACKEND``: auto (default), testcontainers or local."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "testcontainers", "local"):
        raise DevstackError(f"{BACKEND_ENV} must be auto, testcontainers or local, not {value!r}")
    return value  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Tier 1: the environment


def _postgres_from_env() -> PostgresServer | None:
    url = os.environ.get(DATABASE_URL_ENV)
    if not url:
        return None
    server = PostgresServer(url=url, backend="env")
    try:
        version = server.version
    except Exception as exc:
        raise DevstackError(
            f"{DATABASE_URL_ENV}={_pg.redact(url)} does not answer: {type(exc).__name__}: {exc}"
        ) from None
    log.info("devstack: postgres=env(%s) from %s", version, DATABASE_URL_ENV)
    return server


async def _kafka_from_env_async() -> KafkaServer | None:
    bootstrap = os.environ.get(KAFKA_BOOTSTRAP_ENV)
    if not bootstrap:
        return None
    try:
        await _kafka.broker_answers(bootstrap)
    except Exception as exc:
        raise DevstackError(
            f"{KAFKA_BOOTSTRAP_ENV}={bootstrap} does not answer: {type(exc).__name__}: {exc}"
        ) from None
    log.info("devstack: kafka=env from %s=%s", KAFKA_BOOTSTRAP_ENV, bootstrap)
    return KafkaServer(bootstrap=bootstrap, backend="env", version="external")


# --------------------------------------------------------------------------------------------------
# Tier 2: testcontainers


def _docker_configured() -> bool:
    """Whether anything points at a Docker engine (cheap: no import, no connection).

    Importing testcontainers and asking docker-py costs ~0.7 s per backend; without a socket, a
    DOCKER_HOST, a testcontainers override or a docker CLI config there is nothing to ask.
    """
    if any(
        os.environ.get(name)
        for name in ("DOCKER_HOST", "TESTCONTAINERS_DOCKER_SOCKET_OVERRIDE", "TC_HOST")
    ):
        return True
    home = Path.home()
    candidates = [
        Path("/var/run/docker.sock"),
        home / ".docker" / "config.json",
        home / ".docker" / "run" / "docker.sock",
        home / ".testcontainers.properties",
    ]
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        candidates += [Path(runtime) / "docker.sock", Path(runtime) / "podman" / "podman.sock"]
    return any(path.exists() for path in candidates)


def _docker_container(kind: str, build: Callable[[], _T], start: Callable[[_T], None]) -> _T | None:
    """A started testcontainers container, or None when the local process should be used instead.

    None when there is no Docker engine, and, in auto mode, when the engine answers but the container
    cannot be had (image pull refused or impossible, container start failure): that is logged as a
    warning naming the cause. With ``CONVEYOR_DEVSTACK_BACKEND=testcontainers`` every such failure
    is a DevstackError.
    """
    mode = backend_mode()
    if mode == "local":
        return None
    if mode == "auto" and not _docker_configured():
        log.info("devstack: no Docker engine configured; %s runs as a local process", kind)
        return None
    try:
        from docker.errors import DockerException  # type: ignore[import-untyped]
    except ImportError:
        if mode == "testcontainers":
            raise DevstackError(
                f"{BACKEND_ENV}=testcontainers but testcontainers is not installed"
            ) from None
        log.info("devstack: testcontainers not installed; %s runs as a local process", kind)
        return None
    try:
        container = build()
    except DockerException as exc:
        if mode == "testcontainers":
            raise DevstackError(
                f"{BACKEND_ENV}=testcontainers but no Docker engine: {exc}"
            ) from exc
        log.info("devstack: no Docker engine answers; %s runs as a local process", kind)
        return None
    try:
        start(container)
    except Exception as exc:
        image = getattr(container, "image", "?")
        with contextlib.suppress(Exception):
            container.stop()  # type: ignore[attr-defined]
        if mode == "testcontainers":
            raise DevstackError(
                f"testcontainers {kind} ({image}) did not start: {type(exc).__name__}: {exc}"
            ) from exc
        log.warning(
            "devstack: testcontainers %s (%s) did not start (%s: %s); "
            "falling back to a local process (set %s=local to skip Docker)",
            kind,
            image,
            type(exc).__name__,
            _one_line(str(exc)),
            BACKEND_ENV,
        )
        return None
    return container


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _postgres_from_testcontainers() -> PostgresServer | None:
    def build() -> Any:
        from testcontainers.community.postgres import PostgresContainer

        image = os.environ.get(POSTGRES_IMAGE_ENV, POSTGRES_IMAGE)
        return PostgresContainer(
            image, username="postgres", password="postgres", dbname="conveyor", driver=None
        )

    container = _docker_container("postgres", build, lambda c: c.start())
    if container is None:
        return None
    server = PostgresServer(
        url=container.get_connection_url(), backend="testcontainers", closer=container.stop
    )
    log.info("devstack: postgres=testcontainers(%s)", container.image)
    return server


def _kafka_from_testcontainers() -> KafkaServer | None:
    def build() -> Any:
        from testcontainers.community.kafka import KafkaContainer

        image = os.environ.get(KAFKA_IMAGE_ENV, KAFKA_IMAGE)
        return KafkaContainer(image).with_kraft()

    container = _docker_container("kafka", build, lambda c: c.start())
    if container is None:
        return None
    image = str(container.image)
    log.info("devstack: kafka=testcontainers(%s)", image)
    return KafkaServer(
        bootstrap=container.get_bootstrap_server(),
        backend="testcontainers",
        version=image.rsplit(":", 1)[-1],
        closer=container.stop,
    )


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
        server = _kafka.run_coroutine_sync(_kafka_from_env_async) or _kafka_from_testcontainers()
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
