"""Kafka consumer wrapper: manual commit after handling, dedup hook, retries, dead-letter topic.

Records are handled in order within a partition (partitions in parallel); an offset is committed
only after its record and every earlier one were handled or dead-lettered, so a crash means
redelivery, never loss: handlers must be idempotent (dedupe on ``Envelope.id`` or by state-machine
guards). When a batch cannot be finished (the dead-letter topic or the dedup hook is unreachable),
the consumer commits what was handled, rewinds to the first unhandled record and tries again after a
pause, rather than stopping.

A record that cannot be decoded, a handler raising :class:`PermanentError`, or a handler failing
``max_attempts`` times goes to ``<topic>.dlq`` with ``x-original-*`` and ``x-error`` headers.

Offsets are committed at most every ``commit_interval_ms`` (and whenever the consumer goes idle, loses
partitions in a rebalance or stops), not after every batch: a commit is a round trip and a write to
the broker's offsets log, and at a few records per fetch it cost as much as the records. A crash
redelivers at most that interval's handled records more, which the idempotent handlers absorb as
they absorb any redelivery. ``commit_interval_ms=0`` commits after every batch. The default, one
second, is a fifth of Kafka's own auto-commit interval: with 100 ms every consumer of the pipeline
still committed about ten times a second under load (1.16 offset records per task at 100 tasks/s,
0.18 with one second) and once per record at a few tasks a second.

With a ``batch_handler`` the whole fetched batch (every partition's records, each partition's in
order) is handed over in one call, so a consumer can apply it in one transaction or one RPC; if that
call fails, the batch is handled record by record with ``handler`` (isolating a bad record, which is
retried and dead-lettered as above), so one poison record never blocks the rest.

With ``key_concurrency`` > 1 the records are streamed by key instead (``kafka.streaming``): records
of different keys run side by side across fetches, a slow one holds only its key and its
partition's committable prefix, never the next fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from conveyor_common import topics as topic_names
from conveyor_common import tracing
from conveyor_common.context import bound
from conveyor_common.kafka.envelope import DecodeError, Envelope, TypeRegistry, decode
from conveyor_common.kafka.producer import EventProducer
from conveyor_common.kafka.security import PLAINTEXT, KafkaSecurity, start_client
from conveyor_common.kafka.streaming import KeyedStream
from conveyor_common.metrics import KafkaMetrics
from conveyor_common.randomness import rng

logger = logging.getLogger(__name__)

Handler = Callable[[Envelope], Awaitable[None]]
BatchHandler = Callable[[Sequence[Envelope]], Awaitable[None]]
"""Handles a whole fetched batch at once (in partition order within each partition)."""


class PermanentError(Exception):
    """Raised by a handler for a record that can never be handled: it goes to the DLQ at once."""


class Deduplicator(Protocol):
    """Optional dedup hook around the handler (consumers with a DB do it in their transaction)."""

    async def seen(self, envelope: Envelope) -> bool:
        """True when the event was handled before."""
        ...

    async def mark(self, envelope: Envelope) -> None:
        """Remember that the event was handled."""
        ...


@dataclass(frozen=True)
class ConsumerConfig:
    """Consumer settings."""

    bootstrap_servers: str
    group_id: str
    topics: Sequence[str]
    client_id: str = "conveyor"
    max_attempts: int = 5
    retry_backoff_seconds: float = 0.2
    max_batch: int = 200
    fetch_timeout_ms: int = 500
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    auto_offset_reset: str = "earliest"
    commit_interval_ms: int = 1000
    """Handled offsets are committed at most this often (0: after every batch; see the module
    docstring)."""
    key_concurrency: int = 1
    """Records of different keys are handled side by side, up to this many in hand at once over
    every partition, fetching again as half of them free up (``kafka.streaming``; 1: a partition's
    records one after another, a batch at a time). A key's records always stay in order."""
    security: KafkaSecurity = PLAINTEXT
    """TLS and SASL of the connection (``settings.kafka_security``)."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: EventConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Let the records in hand finish and commit what was handled before the partitions move.
        stream = self.owner._stream
        if stream is not None:
            await stream.drain()
            stream.reset(revoked)
        async with self.owner._batch_lock:
            await self.owner._commit_pending()
        self.owner._forget_lag(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        logger.info(
            "partitions assigned",
            extra={
                "action": "partitions_assigned",
                "partitions": sorted(str(tp) for tp in assigned),
            },
        )


class EventConsumer:
    """Consumes envelopes from ``config.topics`` with ``handler``."""

    def __init__(
        self,
        config: ConsumerConfig,
        handler: Handler,
        *,
        registry: TypeRegistry,
        dlq_producer: EventProducer,
        dedup: Deduplicator | None = None,
        metrics: KafkaMetrics | None = None,
        batch_handler: BatchHandler | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.batch_handler = batch_handler
        self.registry = registry
        self.dlq_producer = dlq_producer
        self.dedup = dedup
        self.metrics = metrics
        self._consumer: Any = AIOKafkaConsumer(
            bootstrap_servers=config.bootstrap_servers,
            group_id=config.group_id,
            client_id=config.client_id,
            enable_auto_commit=False,
            auto_offset_reset=config.auto_offset_reset,
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
            max_poll_records=config.max_batch,
            **config.security.client_kwargs(),
        )
        if config.key_concurrency > 1 and batch_handler is not None:
            raise ValueError("key_concurrency > 1 streams records one by one: no batch_handler")
        self._batch_lock = asyncio.Lock()
        self._stream = (
            KeyedStream(config.key_concurrency, self._handle_record, self._handled_prefix)
            if config.key_concurrency > 1
            else None
        )
        self._pending: dict[TopicPartition, int] = {}
        """Handled offsets not yet committed (see ``commit_interval_ms``)."""
        self._last_commit = time.monotonic()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False

    async def start(self) -> None:
        """Join the group and start consuming in a background task (:class:`KafkaStartError` saying
        why when it cannot connect)."""
        config = self.config
        await start_client(
            self._consumer, config.bootstrap_servers, config.security, f"consumer {config.group_id}"
        )
        self._consumer.subscribe(list(self.config.topics), listener=_Listener(self))
        self._started = True
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.config.group_id}")

    async def stop(self) -> None:
        """Stop fetching, finish the batch in hand, commit, leave the group (idempotent)."""
        if not self._started:
            return
        self._started = False
        self._stopping.set()
        if self._stream is not None:
            self._stream.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=30)
            except TimeoutError:
                self._task.cancel()
        if self._stream is not None and not await self._stream.drain(within_s=30):
            await self._stream.cancel()
        async with self._batch_lock:
            await self._commit_pending()
        await self._consumer.stop()

    async def _run(self) -> None:
        if self._stream is not None:
            await self._run_stream(self._stream)
            return
        while not self._stopping.is_set():
            try:
                batches = await self._consumer.getmany(
                    timeout_ms=self.config.fetch_timeout_ms, max_records=self.config.max_batch
                )
            except Exception:
                logger.exception("fetch failed", extra={"action": "kafka_fetch_failed"})
                await asyncio.sleep(1)
                continue
            if not batches:
                async with self._batch_lock:
                    await self._commit_pending()
                await self._update_lag()
                continue
            failed = False
            async with self._batch_lock:
                done: dict[TopicPartition, int] = {}
                if self.batch_handler is not None and await self._handle_batch(batches, done):
                    outcomes: list[Any] = []
                else:
                    outcomes = await asyncio.gather(
                        *(self._handle_partition(tp, recs, done) for tp, recs in batches.items()),
                        return_exceptions=True,
                    )
                for outcome in outcomes:
                    if isinstance(outcome, asyncio.CancelledError):
                        raise outcome
                    if isinstance(outcome, BaseException):
                        failed = True
                        logger.error(
                            "batch not fully handled; re-reading from the first unhandled record",
                            extra={"action": "kafka_batch_failed"},
                            exc_info=outcome,
                        )
                if failed:
                    # The fetch position is past the batch: rewind every partition to its first
                    # unhandled record, or a later commit would skip what was not handled.
                    for tp, recs in batches.items():
                        with contextlib.suppress(Exception):
                            self._consumer.seek(tp, done.get(tp, recs[0].offset))
                self._pending.update(done)
                interval = self.config.commit_interval_ms / 1000
                if failed or time.monotonic() - self._last_commit >= interval:
                    await self._commit_pending()
            await self._update_lag()
            if failed:
                await asyncio.sleep(1)

    async def _run_stream(self, stream: KeyedStream) -> None:
        """Fetch whenever a record can be taken; commit handled prefixes as they grow."""
        interval = self.config.commit_interval_ms / 1000
        while not self._stopping.is_set():
            await stream.wait_room()
            if self._stopping.is_set():
                break
            if stream.failure is not None:
                await self._rewind(stream)
                continue
            try:
                batches = await self._consumer.getmany(
                    timeout_ms=self.config.fetch_timeout_ms,
                    max_records=min(stream.room, self.config.max_batch),
                )
            except Exception:
                logger.exception("fetch failed", extra={"action": "kafka_fetch_failed"})
                await asyncio.sleep(1)
                continue
            for tp, records in batches.items():
                stream.add(tp, records)
            if not batches or time.monotonic() - self._last_commit >= interval:
                async with self._batch_lock:
                    await self._commit_pending()
            if not batches and not stream.in_hand:
                await self._update_lag()

    async def _rewind(self, stream: KeyedStream) -> None:
        """After a failure: wait for the records in hand, commit what was handled, and rewind each
        partition to its first record not handled (the fetch position is past it)."""
        logger.error(
            "record not handled; re-reading from the first unhandled record",
            extra={"action": "kafka_batch_failed"},
            exc_info=stream.failure,
        )
        await stream.drain()
        for tp, offset in stream.rewind_points().items():
            with contextlib.suppress(Exception):
                self._consumer.seek(tp, offset)
        stream.reset()
        async with self._batch_lock:
            await self._commit_pending()
        await asyncio.sleep(1)

    def _handled_prefix(self, tp: TopicPartition, next_offset: int) -> None:
        self._pending[tp] = next_offset
        self._record_lag(tp, next_offset)

    async def _commit_pending(self) -> None:
        """Commit the handled offsets not yet committed (call under ``_batch_lock``)."""
        self._last_commit = time.monotonic()
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        assigned = self._consumer.assignment()
        offsets = {tp: offset for tp, offset in pending.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except Exception:
            # A rebalance took the partitions: the new owner re-handles (idempotently).
            logger.warning("commit failed", extra={"action": "kafka_commit_failed"}, exc_info=True)

    async def _update_lag(self) -> None:
        """Lag = high watermark - position, per assigned partition. Called between batches, when
        the position is just past the last handled record."""
        if self.metrics is None:
            return
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except Exception:
                continue
            self.metrics.lag.labels(
                self.metrics.service, self.config.group_id, tp.topic, str(tp.partition)
            ).set(max(0, high - position))

    def _forget_lag(self, partitions: Any) -> None:
        """Drop the lag series of partitions this member no longer owns: their new owner reports
        them, and a stale value left here would keep an autoscaler from scaling down."""
        if self.metrics is None:
            return
        for tp in partitions:
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(
                    self.metrics.service, self.config.group_id, tp.topic, str(tp.partition)
                )

    async def _handle_batch(
        self, batches: dict[TopicPartition, list[Any]], done: dict[TopicPartition, int]
    ) -> bool:
        """Hand the whole batch to ``batch_handler``; False (nothing marked done) if it failed."""
        assert self.batch_handler is not None
        envelopes: list[Envelope] = []
        undecodable: list[Any] = []
        for records in batches.values():
            for record in records:
                try:
                    envelopes.append(decode(record, self.registry))
                except DecodeError:
                    undecodable.append(record)
        if undecodable or self.dedup is not None:
            return False  # the record-by-record path dead-letters and deduplicates
        topic = self.config.topics[0] if len(self.config.topics) == 1 else "batch"
        started = time.perf_counter()
        try:
            with tracing.span(
                f"{topic} process",
                tracing.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.destination.name": topic,
                    "messaging.batch.message_count": len(envelopes),
                },
            ):
                await self.batch_handler(envelopes)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning(
                "batch handler failed; handling the batch record by record",
                extra={"action": "kafka_batch_fallback", "records": len(envelopes)},
                exc_info=True,
            )
            return False
        elapsed = time.perf_counter() - started
        for tp, records in batches.items():
            done[tp] = records[-1].offset + 1
            self._record_lag(tp, records[-1].offset + 1)
            if self.metrics:
                self.metrics.consumed.labels(self.metrics.service, tp.topic, "handled").inc(
                    len(records)
                )
                self.metrics.handle_seconds.labels(self.metrics.service, tp.topic).observe(
                    elapsed / max(1, len(envelopes))
                )
        return True

    async def _handle_partition(
        self, tp: TopicPartition, records: list[Any], done: dict[TopicPartition, int]
    ) -> None:
        """Handle ``records`` in order; ``done[tp]`` is the offset after the last one handled."""
        for record in records:
            await self._handle_record(record)
            done[tp] = record.offset + 1
            self._record_lag(tp, record.offset + 1)

    def _record_lag(self, tp: TopicPartition, next_offset: int) -> None:
        """Lag after one handled record: a long batch keeps the gauge moving (autoscaling)."""
        if self.metrics is None:
            return
        high = self._consumer.highwater(tp)
        if high is not None:
            self.metrics.lag.labels(
                self.metrics.service, self.config.group_id, tp.topic, str(tp.partition)
            ).set(max(0, high - next_offset))

    async def _handle_record(self, record: Any) -> None:
        topic = record.topic
        started = time.perf_counter()
        try:
            envelope = decode(record, self.registry)
        except DecodeError as exc:
            await self._dead_letter(record, f"decode: {exc}")
            self._count(topic, "undecodable")
            return
        with (
            bound(task_id=envelope.key or None, traceparent=envelope.traceparent),
            tracing.span(
                f"{topic} process",
                tracing.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.destination.name": topic,
                    "conveyor.task_id": envelope.key or "",
                },
            ),
        ):
            if self.dedup is not None and await self.dedup.seen(envelope):
                self._count(topic, "duplicate")
                return
            attempt = 0
            while True:
                attempt += 1
                try:
                    await self.handler(envelope)
                    break
                except PermanentError as exc:
                    await self._dead_letter(record, f"permanent: {exc}")
                    self._count(topic, "dead_lettered")
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if attempt >= self.config.max_attempts:
                        logger.exception(
                            "handler failed, dead-lettering",
                            extra={"action": "kafka_handler_gave_up", "topic": topic},
                        )
                        await self._dead_letter(record, f"failed {attempt} times: {exc!r}")
                        self._count(topic, "dead_lettered")
                        return
                    self._count(topic, "retried")
                    delay = self.config.retry_backoff_seconds * (2 ** (attempt - 1))
                    await asyncio.sleep(delay * (0.5 + rng.random()))
            if self.dedup is not None:
                await self.dedup.mark(envelope)
        self._count(topic, "handled")
        if self.metrics:
            self.metrics.handle_seconds.labels(self.metrics.service, topic).observe(
                time.perf_counter() - started
            )

    def _count(self, topic: str, outcome: str) -> None:
        if self.metrics:
            self.metrics.consumed.labels(self.metrics.service, topic, outcome).inc()

    async def _dead_letter(self, record: Any, error: str) -> None:
        headers = list(record.headers or [])
        headers += [
            ("x-original-topic", record.topic.encode()),
            ("x-original-partition", str(record.partition).encode()),
            ("x-original-offset", str(record.offset).encode()),
            ("x-error", error[:500].encode()),
        ]
        value = record.value if isinstance(record.value, bytes) else b""
        await self.dlq_producer.send_raw(topic_names.dlq(record.topic), record.key, value, headers)
        logger.warning(
            "record dead-lettered",
            extra={"action": "kafka_dead_lettered", "topic": record.topic, "error": error[:200]},
        )
