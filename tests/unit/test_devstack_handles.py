"""The server handles shared by PostgreSQL and Kafka: restarts only for the local-process backend,
``close`` runs its cleanup once."""

from __future__ import annotations

import pytest

from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka import KafkaServer
from conveyor_devstack.postgres import PostgresServer


def test_restarts_of_a_server_from_the_environment_are_refused_by_name() -> None:
    pg = PostgresServer(url="postgresql://u@127.0.0.1:5432/conveyor", backend="env")
    kafka = KafkaServer(bootstrap="127.0.0.1:9092", backend="testcontainers", version="4.1.1")
    assert not pg.can_restart
    assert not kafka.can_restart
    with pytest.raises(DevstackError, match="this PostgreSQL is 'env'"):
        pg.stop()
    with pytest.raises(DevstackError, match="this Kafka is 'testcontainers'"):
        kafka.start()


def test_close_runs_the_closer_once() -> None:
    closed: list[str] = []
    kafka = KafkaServer(
        bootstrap="127.0.0.1:9092",
        backend="testcontainers",
        version="4.1.1",
        closer=lambda: closed.append("kafka"),
    )
    kafka.close()
    kafka.close()
    assert closed == ["kafka"]
