"""The outbox relay on real PostgreSQL: one pipelined transaction per pass, rows out in id order with
their stored headers, and a fetch that stays an index scan however many published rows left dead
entries behind (a bitmap scan would visit every one of them on every pass)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from conveyor_common.kafka.envelope import Headers
from conveyor_scheduler.settings import to_libpq_url
from conveyor_scheduler.store import relay
from conveyor_scheduler.store.db import create_engine
from conveyor_testkit import scheduler as kit

pytestmark = [pytest.mark.integration]


class Collect:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, Headers]] = []

    async def send_many(self, items: list[tuple[str, bytes | None, bytes, Headers]]) -> None:
        self.sent.extend(items)


class Down:
    async def send_many(self, items: list[tuple[str, bytes | None, bytes, Headers]]) -> None:
        raise ConnectionError("broker unreachable")


def add_rows(conn: psycopg.Connection[Any], n: int) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO outbox (event_id, topic, key, ce_type, payload, headers)"
            " VALUES (%s, 't', %s, 'conveyor.events.v1.X', %s, %s)",
            [
                (uuid.uuid4(), f"task-{i}", f"p{i}".encode(), json.dumps({"ce_time": str(i)}))
                for i in range(n)
            ],
        )


@pytest.mark.parametrize("keep", [False, True], ids=["deletes", "marks"])
async def test_relay_publishes_in_id_order_retires_rows_and_keeps_an_index_scan(
    database_url: str, keep: bool
) -> None:
    """Published rows are deleted in the pass, or marked when a retention keeps them."""
    await kit.migrate(database_url)
    engine = create_engine(database_url, pool_size=2)
    out = Collect()
    r = relay.OutboxRelay(engine, out, leader=Any, wakeups=Any, batch=200, keep_published=keep)  # type: ignore[arg-type]
    try:
        with psycopg.connect(to_libpq_url(database_url), autocommit=True) as conn:
            conn.execute("DELETE FROM outbox")
            add_rows(conn, 3000)
            while await r.pass_once():
                pass
            assert len(out.sent) == 3000
            keys = [key for _, key, _, _ in out.sent]
            assert keys == [f"task-{i}".encode() for i in range(3000)]
            topic, _, payload, headers = out.sent[7]
            assert (topic, payload) == ("t", b"p7")
            assert dict(headers)["ce_time"] == b"7"
            assert dict(headers)["ce_subject"] == b"task-7"
            unpublished = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            assert unpublished.fetchone() == (0,)
            kept = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
            assert kept.fetchone() == ((3000 if keep else 0),)

            # A failed publish rolls the pass back: nothing is marked, the next pass sends it.
            add_rows(conn, 5)
            with pytest.raises(ConnectionError):
                await relay.OutboxRelay(engine, Down(), Any, Any).pass_once()  # type: ignore[arg-type]
            assert await r.pass_once() == 5
            assert len(out.sent) == 3005

            # 3,005 dead entries in ix_outbox_unpublished (no vacuum ran): the fetch the relay
            # plans under its settings walks the index in id order, not a bitmap of them all.
            with conn.transaction():
                conn.execute(relay._INDEX_SCAN_SQL)
                conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                plan = conn.execute(
                    "EXPLAIN " + relay._FETCH_SQL.replace("%(n)s", "500")
                ).fetchall()
            text = "\n".join(row[0] for row in plan)
            assert "Index Scan using ix_outbox_unpublished" in text, text
            assert "Bitmap" not in text, text
    finally:
        await engine.dispose()
