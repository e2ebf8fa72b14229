"""The scheduler benchmark's baseline: a plain SKIP LOCKED work queue on the same PostgreSQL, the
reference the scheduler's figures are compared with.
"""

from __future__ import annotations

import asyncio
import time

import psycopg

_BASELINE_SCHEMA = """
DROP TABLE IF EXISTS naive_jobs, naive_user_slots, naive_global;
CREATE TABLE naive_jobs (id bigserial PRIMARY KEY, user_id int NOT NULL, priority int NOT NULL,
  state smallint NOT NULL DEFAULT 0, payload jsonb NOT NULL DEFAULT '{}');
CREATE INDEX naive_jobs_avail ON naive_jobs (priority, id) WHERE state = 0;
CREATE TABLE naive_user_slots (user_id int PRIMARY KEY, running int NOT NULL DEFAULT 0,
  max_running int NOT NULL, CHECK (running >= 0 AND running <= max_running));
CREATE TABLE naive_global (id int PRIMARY KEY, running int NOT NULL DEFAULT 0, max_running int NOT NULL,
  CHECK (running >= 0 AND running <= max_running));
"""


async def baseline(url: str, jobs: int, skew: bool, seconds: float, clients: int = 8) -> float:
    """Claim-one + complete-one cycles with per-user and one global counter row; jobs/s."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(_BASELINE_SCHEMA)
        heavy = int(jobs * 0.9) if skew else 0
        await conn.execute(
            "INSERT INTO naive_jobs (user_id, priority) SELECT 0, 1 FROM generate_series(1, %s)",
            (heavy,),
        )
        await conn.execute(
            "INSERT INTO naive_jobs (user_id, priority)"
            " SELECT (random() * 999)::int, 1 FROM generate_series(1, %s)",
            (jobs - heavy,),
        )
        await conn.execute(
            "INSERT INTO naive_user_slots (user_id, max_running) SELECT g, 3 FROM generate_series(0, 999) g"
        )
        await conn.execute("INSERT INTO naive_global VALUES (1, 0, 1000)")
        await conn.execute("VACUUM ANALYZE naive_jobs")
    claim = """
        WITH c AS (
          SELECT j.id, j.user_id FROM naive_jobs j JOIN naive_user_slots u USING (user_id)
          WHERE j.state = 0 AND u.running < u.max_running
          ORDER BY j.priority, j.id LIMIT 1 FOR UPDATE OF j SKIP LOCKED)
        UPDATE naive_jobs j SET state = 1 FROM c WHERE j.id = c.id RETURNING j.id, j.user_id
    """
    done = 0
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        async with await psycopg.AsyncConnection.connect(url) as conn:
            while time.monotonic() < stop_at:
                row = await (await conn.execute(claim)).fetchone()
                if row is None:
                    await conn.rollback()
                    continue
                job_id, user_id = row
                ok = await conn.execute(
                    "UPDATE naive_user_slots SET running = running + 1"
                    " WHERE user_id = %s AND running < max_running",
                    (user_id,),
                )
                g = await conn.execute(
                    "UPDATE naive_global SET running = running + 1 WHERE id = 1 AND running < max_running"
                )
                if ok.rowcount != 1 or g.rowcount != 1:
                    await conn.rollback()
                    continue
                await conn.commit()
                await conn.execute("UPDATE naive_jobs SET state = 2 WHERE id = %s", (job_id,))
                await conn.execute(
                    "UPDATE naive_user_slots SET running = running - 1 WHERE user_id = %s",
                    (user_id,),
                )
                await conn.execute("UPDATE naive_global SET running = running - 1 WHERE id = 1")
                await conn.commit()
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - started)
