"""The devstack's PostgreSQL: version 15, a fresh database per module, templates, stop/start."""

from __future__ import annotations

import socket

import psycopg
import pytest

from conveyor_devstack import PostgresServer, _process, start_postgres

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_postgres_answers_select_version_with_15(devstack_postgres: PostgresServer) -> None:
    with psycopg.connect(devstack_postgres.url) as conn:
        row = conn.execute("select version(), current_setting('server_version_num')").fetchone()
    assert row is not None
    version, version_num = row
    assert str(version).startswith("PostgreSQL 15.")
    assert int(version_num) // 10000 == 15
    assert devstack_postgres.label.endswith(f"({devstack_postgres.short_version})")


def test_database_url_is_a_fresh_empty_database_for_this_module(
    database_url: str, devstack_postgres: PostgresServer
) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "select current_database(),"
            " (select count(*) from information_schema.tables where table_schema = 'public')"
        ).fetchone()
    assert row is not None
    name, tables = row
    assert str(name).startswith("t_test_devstack_postgres_")
    assert name != "conveyor"
    assert tables == 0
    with devstack_postgres.connect("postgres") as conn:
        found = conn.execute("select 1 from pg_database where datname = %s", [name]).fetchone()
    assert found is not None


def test_create_database_from_a_template_copies_schema_and_rows(
    devstack_postgres: PostgresServer,
) -> None:
    template_url = devstack_postgres.create_database("devstack_tpl", replace=True)
    try:
        with psycopg.connect(template_url, autocommit=True) as conn:
            conn.execute("create table item (id int primary key, name text not null)")
            conn.execute("insert into item values (1, 'one'), (2, 'two')")
        copy_url = devstack_postgres.create_database(
            "devstack_copy", template="devstack_tpl", replace=True
        )
        with psycopg.connect(copy_url) as conn:
            rows = conn.execute("select id, name from item order by id").fetchall()
        assert rows == [(1, "one"), (2, "two")]
    finally:
        devstack_postgres.drop_database("devstack_copy")
        devstack_postgres.drop_database("devstack_tpl")
    with devstack_postgres.connect("postgres") as conn:
        left = conn.execute(
            "select count(*) from pg_database where datname like 'devstack_%%'"
        ).fetchone()
    assert left == (0,)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_stop_and_start_keep_committed_rows(
    database_url: str, devstack_postgres: PostgresServer, mode: str
) -> None:
    if not devstack_postgres.can_restart:
        pytest.skip(f"stop/start needs the local-process backend, not {devstack_postgres.backend}")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("create table if not exists survivor (mode text primary key)")
        conn.execute("insert into survivor values (%s)", [mode])
    port = devstack_postgres.local.port

    devstack_postgres.stop(mode)  # type: ignore[arg-type]
    assert not devstack_postgres.local.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(database_url, connect_timeout=2)

    devstack_postgres.start()
    assert devstack_postgres.local.port == port
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("select mode from survivor order by mode").fetchall()
    assert (mode,) in rows


def test_a_port_taken_before_postgres_binds_it_is_retried_on_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = int(taken.getsockname()[1])
    real_free_ports = _process.free_ports
    offered: list[int] = []

    def first_a_taken_port(count: int) -> list[int]:
        ports = [taken_port] if not offered else real_free_ports(count)
        offered.extend(ports)
        return ports

    monkeypatch.setattr(_process, "free_ports", first_a_taken_port)
    monkeypatch.delenv("CONVEYOR_TEST_DATABASE_URL", raising=False)
    monkeypatch.setenv("CONVEYOR_DEVSTACK_BACKEND", "local")
    try:
        server = start_postgres(fast=True)
        try:
            assert server.local.port != taken_port
            assert offered[0] == taken_port
            assert len(offered) == 2
            with psycopg.connect(server.url) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
        finally:
            server.close()
    finally:
        taken.close()
