"""The devstack without backends: URLs, backend choice, and what it says when something is missing."""

from __future__ import annotations

import base64
import logging
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest

from conveyor_devstack import DevstackError, LocalKafka, kafka_install, sqlalchemy_url
from conveyor_devstack import backends as backends_module
from conveyor_devstack import stack as stack_module
from conveyor_devstack.__main__ import _render
from conveyor_devstack.backends import backend_mode
from conveyor_devstack.kafka_install import fetch_kafka, find_java, find_mvn, kafka_version
from conveyor_devstack.pg_binaries import find_pg_binaries
from conveyor_devstack.postgres import libpq_url, redact, with_database
from conveyor_devstack.stack import start_kafka, start_postgres


def test_urls_convert_between_libpq_and_sqlalchemy() -> None:
    url = "postgresql+psycopg://u:secret@127.0.0.1:5432/conveyor"
    assert libpq_url(url) == "postgresql://u:secret@127.0.0.1:5432/conveyor"
    assert libpq_url("postgres://h/db") == "postgresql://h/db"
    assert sqlalchemy_url("postgresql://h:1/db", "asyncpg") == "postgresql+asyncpg://h:1/db"
    assert with_database("postgresql://h:1/db?sslmode=disable", "x") == (
        "postgresql://h:1/x?sslmode=disable"
    )
    assert redact(url) == "postgresql+psycopg://u:***@127.0.0.1:5432/conveyor"
    with pytest.raises(DevstackError, match="not a PostgreSQL URL"):
        libpq_url("mysql://h/db")


def test_backend_mode_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_DEVSTACK_BACKEND", "LOCAL")
    assert backend_mode() == "local"
    monkeypatch.setenv("CONVEYOR_DEVSTACK_BACKEND", "docker")
    with pytest.raises(DevstackError, match="auto, testcontainers or local"):
        backend_mode()


def test_missing_postgres_binaries_are_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CONVEYOR_DEVSTACK_PG_BINDIR", str(tmp_path))
    with pytest.raises(DevstackError, match=r"initdb, postgres\) not found.*postgresql-15"):
        find_pg_binaries()


def test_missing_java_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_DEVSTACK_JAVA", raising=False)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(DevstackError, match=r"java not found.*Java 17"):
        find_java()
    monkeypatch.setenv("CONVEYOR_DEVSTACK_JAVA", "/nonexistent/java")
    with pytest.raises(DevstackError, match="-version` failed"):
        find_java()


def test_missing_mvn_is_named_and_nothing_is_fetched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CONVEYOR_DEVSTACK_MVN", raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("CONVEYOR_DEVSTACK_CACHE", str(tmp_path))
    with pytest.raises(DevstackError, match=r"Apache Maven \(mvn\) not found"):
        find_mvn()
    with pytest.raises(DevstackError, match="mvn"):
        fetch_kafka()
    assert not list((tmp_path / f"kafka-{kafka_version()}").glob("libs*"))


def test_local_kafka_without_java_fails_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONVEYOR_DEVSTACK_JAVA", "/nonexistent/java")
    kafka = LocalKafka()
    with pytest.raises(DevstackError, match=r"Kafka 4 needs Java 17|-version` failed"):
        kafka.start()
    assert not kafka.running
    assert kafka.root is None


def test_urls_from_the_environment_must_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_TEST_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/x")
    with pytest.raises(DevstackError, match=r"CONVEYOR_TEST_DATABASE_URL=.* does not answer"):
        start_postgres()
    monkeypatch.setenv("CONVEYOR_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    with pytest.raises(
        DevstackError, match=r"CONVEYOR_TEST_KAFKA_BOOTSTRAP=127\.0\.0\.1:1 does not"
    ):
        start_kafka()


def test_testcontainers_mode_without_docker_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_TEST_DATABASE_URL", raising=False)
    monkeypatch.setenv("CONVEYOR_DEVSTACK_BACKEND", "testcontainers")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(DevstackError, match="testcontainers but no Docker engine"):
        start_postgres()


def test_cli_prints_shell_exports() -> None:
    state = {"database_url": "postgresql://p@127.0.0.1:5/c", "kafka_bootstrap": "127.0.0.1:9"}
    assert _render(state, as_json=False).splitlines() == [
        "export CONVEYOR_TEST_DATABASE_URL=postgresql://p@127.0.0.1:5/c",
        "export CONVEYOR_TEST_KAFKA_BOOTSTRAP=127.0.0.1:9",
    ]


@pytest.mark.parametrize(("allow_skip", "outcome"), [("", "1 error"), ("1", "1 skipped")])
def test_fixture_fails_when_a_backend_cannot_start_unless_skips_are_allowed(
    tmp_path: Path, allow_skip: str, outcome: str
) -> None:
    (tmp_path / "test_needs_pg.py").write_text(
        textwrap.dedent(
            """
            def test_needs_pg(database_url):
                assert database_url
            """
        )
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "CONVEYOR_DEVSTACK_BACKEND": "local",
        "CONVEYOR_DEVSTACK_PG_BINDIR": str(tmp_path / "no-such-bindir"),
        "CONVEYOR_ALLOW_SKIP": allow_skip,
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert outcome in run.stdout, run.stdout + run.stderr
    assert "devstack: postgres could not start" in run.stdout
    assert "devstack: postgres=not-used kafka=not-used" in run.stdout


def test_kafka_cluster_ids_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0xF8 as first byte encodes to "-" in url-safe base64: the id the storage tool took for a flag.
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(draws))
    cluster_id = kafka_install._cluster_id()
    assert cluster_id == base64.urlsafe_b64encode(b"\x01" * 16).rstrip(b"=").decode()
    monkeypatch.undo()
    ids = [kafka_install._cluster_id() for _ in range(2000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)


class _FakeContainer:
    """A testcontainers container whose engine answers but cannot give it."""

    instances: ClassVar[list[_FakeContainer]] = []

    def __init__(self, image: str, *args: Any, **kwargs: Any) -> None:
        self.image = image
        self.stopped = False
        _FakeContainer.instances.append(self)

    def with_kraft(self) -> _FakeContainer:
        return self

    def start(self) -> None:
        from docker.errors import ImageNotFound  # type: ignore[import-untyped]

        raise ImageNotFound(
            f"404 Client Error: pull access denied for {self.image}, repository does not exist"
        )

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def docker_that_cannot_pull(monkeypatch: pytest.MonkeyPatch) -> list[_FakeContainer]:
    import testcontainers.community.kafka as tc_kafka
    import testcontainers.community.postgres as tc_postgres

    _FakeContainer.instances = []
    monkeypatch.setattr(tc_postgres, "PostgresContainer", _FakeContainer)
    monkeypatch.setattr(tc_kafka, "KafkaContainer", _FakeContainer)
    monkeypatch.setattr(backends_module, "_docker_configured", lambda: True)
    monkeypatch.delenv("CONVEYOR_TEST_DATABASE_URL", raising=False)
    monkeypatch.delenv("CONVEYOR_TEST_KAFKA_BOOTSTRAP", raising=False)
    return _FakeContainer.instances


def test_auto_mode_falls_back_to_local_processes_when_docker_cannot_pull(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    docker_that_cannot_pull: list[_FakeContainer],
) -> None:
    monkeypatch.setenv("CONVEYOR_DEVSTACK_BACKEND", "auto")
    started: list[str] = []

    class FakeLocalPostgres:
        def __init__(self, **kwargs: Any) -> None:
            pass

        def start(self) -> None:
            started.append("postgres")

        def close(self) -> None:
            pass

    monkeypatch.setattr(stack_module, "LocalPostgres", FakeLocalPostgres)
    monkeypatch.setattr(
        stack_module, "_local_postgres_server", lambda local, started: ("local-process", local)
    )
    with caplog.at_level(logging.WARNING, logger="conveyor_devstack"):
        result: Any = start_postgres()
        backend, local = result
        assert backends_module._kafka_from_testcontainers() is None
    assert backend == "local-process"
    assert isinstance(local, FakeLocalPostgres)
    assert started == ["postgres"]
    assert [c.stopped for c in docker_that_cannot_pull] == [True, True]  # nothing left behind
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert (
        "testcontainers postgres (postgres:15-alpine) did not start (ImageNotFound" in warnings[0]
    )
    assert "pull access denied" in warnings[0]
    assert "falling back to a local process" in warnings[0]
    assert "testcontainers kafka (confluentinc/cp-kafka:8.1.0) did not start" in warnings[1]


def test_testcontainers_mode_reports_a_pull_failure(
    monkeypatch: pytest.MonkeyPatch, docker_that_cannot_pull: list[_FakeContainer]
) -> None:
    monkeypatch.setenv("CONVEYOR_DEVSTACK_BACKEND", "testcontainers")
    with pytest.raises(DevstackError, match=r"testcontainers postgres .* did not start: ImageNotF"):
        start_postgres()
    with pytest.raises(DevstackError, match=r"testcontainers kafka .* did not start"):
        backends_module._kafka_from_testcontainers()


def test_cli_names_the_kafka_credentials_of_a_sasl_ssl_devstack() -> None:
    state = {
        "kafka_bootstrap": "127.0.0.1:9",
        "kafka_security": {
            "protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "conveyor",
            "sasl_password_file": "/tmp/k/tls/client.password",
            "ssl_cafile": "/tmp/k/tls/ca.pem",
        },
    }
    assert _render(state, as_json=False).splitlines() == [
        "# kafka 127.0.0.1:9 SASL_SSL SCRAM-SHA-512: user conveyor, password in "
        "/tmp/k/tls/client.password, CA /tmp/k/tls/ca.pem"
    ]


def test_local_kafka_refuses_an_unknown_listener_security() -> None:
    with pytest.raises(DevstackError, match="one of PLAINTEXT, SASL_SSL"):
        LocalKafka(security="SSL")  # type: ignore[arg-type]
