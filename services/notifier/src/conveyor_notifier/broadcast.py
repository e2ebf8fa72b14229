"""The per-replica reader of the task-event topic for the watch fan-out.

Every replica reads **every** partition (manual assignment, no consumer group, nothing committed)
starting at the end: watchers get live events only; history comes from the scheduler. ``start``
returns once the start positions are fixed, so a subscriber registered afterwards misses nothing
published afterwards. New partitions of the topic are picked up by a periodic metadata check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from conveyor.events.v1 import events_pb2
from conveyor_common.kafka import PLAINTEXT, DecodeError, KafkaSecurity, TypeRegistry, decode
from conveyor_common.kafka.security import start_client
from conveyor_common.metrics import KafkaMetrics
from conveyor_notifier.fanout import WatchHub

logger = logging.getLogger(__name__)

LAG_GROUP = "notifier-watch"
"""``group`` label of this reader in the shared consumer-lag gauge."""


class EventBroadcaster:
    """Reads every partition of ``topic`` from the end and publishes each event to the hub."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        topic: str,
        hub: WatchHub,
        client_id: str,
        kafka_metrics: KafkaMetrics | None = None,
        partition_check_seconds: float = 30.0,
        security: KafkaSecurity = PLAINTEXT,
    ) -> None:
        self.topic = topic
        self.hub = hub
        self.on_webhook_hint: Callable[[], None] | None = None
        """Called for an event whose record says client webhook deliveries came with it."""
        self._bootstrap = bootstrap_servers
        self._security = security
        self.kafka_metrics = kafka_metrics
        self.partition_check_seconds = partition_check_seconds
        self._registry = TypeRegistry([events_pb2.TaskStateChanged])
        self._consumer: Any = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=None,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            max_poll_records=500,
            **security.client_kwargs(),
        )
        self._admin: Any = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap_servers,
            client_id=f"{client_id}-admin",
            **security.client_kwargs(),
        )
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._started = False
        self._assigned: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        """Connect, assign every partition at its end and fix the positions, then read."""
        await start_client(self._consumer, self._bootstrap, self._security, "watch reader")
        self._started = True
        try:
            await start_client(self._admin, self._bootstrap, self._security, "watch reader admin")
            await self._assign_new_partitions(initial=True)
        except BaseException:
            await self.stop()
            raise
        self._task = asyncio.create_task(self._run(), name="watch-broadcast")

    async def _partitions(self) -> set[int]:
        described = await self._admin.describe_topics([self.topic])
        return {
            int(p["partition"])
            for topic in described
            if topic.get("topic") == self.topic and not topic.get("error_code")
            for p in topic.get("partitions", ())
        }

    async def _assign_new_partitions(self, *, initial: bool) -> None:
        for _ in range(50):
            parts = await self._partitions()
            if parts:
                break
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"topic {self.topic} has no partitions")
        wanted = {TopicPartition(self.topic, p) for p in parts}
        new = wanted - self._assigned
        if not new:
            return
        self._consumer.assign(sorted(wanted, key=lambda tp: tp.partition))
        self._assigned = wanted
        # assign() starts a fresh assignment: without a seek, the partitions already read would
        # reset to their end ("latest") and the events published since the last fetch be skipped.
        for tp in wanted - new:
            position = self._positions.get(tp)
            if position is not None:
                self._consumer.seek(tp, position)
        if initial:
            await self._consumer.seek_to_end(*new)
        else:
            # A partition added later holds only events published after it appeared.
            await self._consumer.seek_to_beginning(*new)
        for tp in new:
            self._positions[tp] = await self._consumer.position(tp)  # fixes the start offsets now
        logger.info(
            "watch reader assigned",
            extra={
                "action": "watch_reader_assigned",
                "topic": self.topic,
                "partitions": len(wanted),
            },
        )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self.partition_check_seconds
        while not self._stopping.is_set():
            try:
                batches = await self._consumer.getmany(timeout_ms=250, max_records=500)
            except Exception:
                logger.exception("watch fetch failed", extra={"action": "watch_fetch_failed"})
                await asyncio.sleep(1)
                continue
            for tp, records in batches.items():
                for record in records:
                    self._publish(record)
                if records:
                    self._positions[tp] = records[-1].offset + 1
            self._update_lag()
            if loop.time() >= next_check:
                next_check = loop.time() + self.partition_check_seconds
                try:
                    await self._assign_new_partitions(initial=False)
                except Exception:
                    logger.warning(
                        "partition check failed",
                        extra={"action": "watch_partition_check_failed"},
                        exc_info=True,
                    )

    def _publish(self, record: Any) -> None:
        try:
            envelope = decode(record, self._registry)
        except DecodeError as exc:
            # The webhook consumer group dead-letters it; the watch reader just skips it.
            logger.warning(
                "undecodable task event skipped",
                extra={"action": "watch_record_skipped", "error": str(exc)[:200]},
            )
            return
        message = envelope.message
        if isinstance(message, events_pb2.TaskStateChanged) and message.HasField("event"):
            self.hub.publish(message.event)
            if message.webhook_deliveries and self.on_webhook_hint is not None:
                self.on_webhook_hint()

    def _update_lag(self) -> None:
        if self.kafka_metrics is None:
            return
        for tp in self._assigned:
            high = self._consumer.highwater(tp)
            position = self._positions.get(tp)
            if high is None or position is None:
                continue
            self.kafka_metrics.lag.labels(
                self.kafka_metrics.service, LAG_GROUP, tp.topic, str(tp.partition)
            ).set(max(0, high - position))

    async def stop(self) -> None:
        """Stop reading and disconnect (idempotent)."""
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except TimeoutError:
                self._task.cancel()
            self._task = None
        if self._started:
            self._started = False
            try:
                await self._admin.close()
            finally:
                await self._consumer.stop()
