"""Where the devstack's PostgreSQL and Kafka come from, before local processes: URLs the environment
provides (``CONVEYOR_TEST_DATABASE_URL``, ``CONVEYOR_TEST_KAFKA_BOOTSTRAP``), then testcontainers when a
Docker engine answers (``CONVEYOR_DEVSTACK_BACKEND`` chooses), each failure falling back to the next.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from conveyor_devstack import kafka_install
from conveyor_devstack import postgres as _pg
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka import KafkaServer
from conveyor_devstack.postgres import PostgresServer

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
        await kafka_install.broker_answers(bootstrap)
    except Exception as exc:
        raise DevstackError(
            f"{KAFKA_BOOTSTRAP_ENV}={bootstrap} does not answer: {type(exc).__name__}: {exc}"
        ) from None
    log.info("devstack: kafka=env from %s=%s", KAFKA_BOOTSTRAP_ENV, bootstrap)
    return KafkaServer(bootstrap=bootstrap, backend="env", version="external")


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
