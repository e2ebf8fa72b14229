"""PostgreSQL and Apache Kafka for Conveyor's tests, ``make run`` and benchmarks.

One place decides where they come from (see ``conveyor_devstack.stack``): URLs from the environment,
else testcontainers when a Docker engine answers, else local processes (PostgreSQL 15 from the
machine's binaries, Apache Kafka 4.x in KRaft mode from Maven-resolved jars on Java 17).

    async with Devstack.start(topics=conveyor_topics()) as ds:
        ds.database_url, ds.kafka_bootstrap

Processes started here die with the thread that started them (PR_SET_PDEATHSIG), are stopped at
interpreter exit, and can be stopped explicitly with ``close()``. The pytest fixtures live in
``conveyor_devstack.pytest_plugin``; the CLI is ``python -m conveyor_devstack``.
"""

from __future__ import annotations

import atexit

from conveyor_devstack import kafka as _kafka
from conveyor_devstack import postgres as _postgres
from conveyor_devstack.backends import DATABASE_URL_ENV, KAFKA_BOOTSTRAP_ENV
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka import KafkaServer, LocalKafka
from conveyor_devstack.kafka_install import fetch_kafka
from conveyor_devstack.postgres import LocalPostgres, PostgresServer, sqlalchemy_url
from conveyor_devstack.stack import (
    Devstack,
    start_kafka,
    start_kafka_async,
    start_postgres,
    start_postgres_async,
)
from conveyor_devstack.topics import conveyor_topics, ensure_topics, ensure_topics_sync

__all__ = [
    "DATABASE_URL_ENV",
    "KAFKA_BOOTSTRAP_ENV",
    "Devstack",
    "DevstackError",
    "KafkaServer",
    "LocalKafka",
    "LocalPostgres",
    "PostgresServer",
    "conveyor_topics",
    "ensure_topics",
    "ensure_topics_sync",
    "fetch_kafka",
    "sqlalchemy_url",
    "start_kafka",
    "start_kafka_async",
    "start_postgres",
    "start_postgres_async",
]


def _close_everything() -> None:
    try:
        _kafka.close_all()
    finally:
        _postgres.close_all()


atexit.register(_close_everything)
