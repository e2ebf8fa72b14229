"""The devstack without backends: URLs, backend choice, and what it says when something is missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conveyor_devstack import DevstackError, LocalKafka, sqlalchemy_url
from conveyor_devstack.__main__ import _render
from conveyor_devstack.kafka import fetch_kafka, find_java, find_mvn, kafka_version
from conveyor_devstack.postgres import find_pg_binaries, libpq_url, redact, with_database
from conveyor_devstack.stack import backend_mode, start_kafka, start_postgres


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
