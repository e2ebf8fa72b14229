"""Create Kafka topics with explicit partition counts (idempotent).

Conveyor's topic names and partition counts are defined once, in ``conveyor_common.topics``;
``conveyor_topics()`` returns them with their ``.dlq`` twins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from conveyor_common import topics as _conveyor
from conveyor_common.kafka.security import PLAINTEXT, KafkaSecurity
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka_install import run_coroutine_sync

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


def conveyor_topics() -> dict[str, int]:
    """Every Conveyor topic with its partition count, dead-letter twins included."""
    return _conveyor.all_topics()


async def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    wait_seconds: float = 30.0,
    security: KafkaSecurity = PLAINTEXT,
) -> None:
    """Create the missing ``{name: partitions}`` topics and wait until every partition has a leader.

    Idempotent. An existing topic with a different partition count is an error (never changed
    silently): delete it or pick another name. ``wait_seconds`` bounds each request and the wait
    for leaders. ``security``: TLS and SASL of the admin connection.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    if not topics:
        return
    timeout_ms = int(wait_seconds * 1000)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms, **security.client_kwargs()
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, partitions, replication_factor)
            for name, partitions in topics.items()
            if name not in existing
        ]
        if missing:
            response = await admin.create_topics(missing, timeout_ms=timeout_ms)
            for err in response.to_object()["topic_errors"]:
                if err["error_code"] not in (0, _TOPIC_ALREADY_EXISTS):
                    raise DevstackError(
                        f"creating topic {err['topic']!r} failed: error {err['error_code']} "
                        f"{err.get('error_message') or ''}"
                    )
            log.info(
                "devstack: created topics %s",
                ", ".join(f"{t.name}({t.num_partitions})" for t in missing),
            )
        await _wait_for_leaders(admin, topics, time.monotonic() + wait_seconds)
    finally:
        await admin.close()


async def _wait_for_leaders(admin: Any, topics: Mapping[str, int], deadline: float) -> None:
    pending = dict(topics)
    while True:
        described = await admin.describe_topics(list(pending))
        for topic in described:
            name = topic["topic"]
            partitions = topic["partitions"]
            if topic["error_code"] != 0 or not partitions:
                continue
            if len(partitions) != pending[name]:
                raise DevstackError(
                    f"topic {name!r} exists with {len(partitions)} partitions, "
                    f"expected {pending[name]}"
                )
            if all(p["leader"] >= 0 for p in partitions):
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise DevstackError(f"topics without leaders after the timeout: {sorted(pending)}")
        await asyncio.sleep(0.05)


def ensure_topics_sync(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    wait_seconds: float = 30.0,
    security: KafkaSecurity = PLAINTEXT,
) -> None:
    """``ensure_topics`` for synchronous callers (a private event loop in a worker thread)."""
    run_coroutine_sync(
        lambda: ensure_topics(
            bootstrap,
            topics,
            replication_factor=replication_factor,
            wait_seconds=wait_seconds,
            security=security,
        )
    )
