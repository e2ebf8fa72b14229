"""The scheduler's schema: SQLAlchemy 2.0 typed models on one MetaData with a naming convention.

PostgreSQL is the source of truth of Conveyor. Every invariant that can be a constraint is one, so an
over-admission or a double terminal transition fails loudly instead of corrupting state. Each table
and constraint carries a comment saying why it exists (they end up in the catalog, visible with
``\\d+``). The alembic revisions under ``services/scheduler/migrations`` build exactly this schema
(a test compares them).

Status, kind, priority, tier and event type columns store the protobuf enum numbers of
``conveyor.tasks.v1`` (smallint with CHECK ranges): the proto is the contract and the numbers there
never change meaning.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from conveyor_common.vocabulary import (
    ACTIVE_STATUSES,
    CANCELED,
    DEAD_LETTERED,
    DISPATCHED,
    EXPIRED,
    FAILED,
    KIND_NAME,
    PRIORITY_NAME,
    QUEUED,
    RUNNING,
    STATUS_NAME,
    SUCCEEDED,
    TERMINAL_STATUSES,
    TIER_NAME,
    between,
)

__all__ = [
    "ACTIVE_STATUSES",
    "CANCELED",
    "DEAD_LETTERED",
    "DISPATCHED",
    "EXPIRED",
    "FAILED",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "TERMINAL_STATUSES",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

QUEUE_SHARDS = 16
"""Rows of queue_counters (see there)."""


class Base(DeclarativeBase):
    """Declarative base; the webhook models of ``conveyor_scheduler.client_webhooks`` share its metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now() -> Any:
    return text("now()")


class Tenant(Base):
    """A tenant's tier, explicit limits, and its admission counters."""

    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("waiting >= 0", name="waiting_nonneg"),
        CheckConstraint("tier IS NULL OR " + between("tier", TIER_NAME), name="tier_range"),
        CheckConstraint(
            "(max_concurrency IS NULL OR max_concurrency >= 1)"
            " AND (max_waiting IS NULL OR max_waiting >= 1)"
            " AND (submit_rate IS NULL OR submit_rate > 0)"
            " AND (submit_burst IS NULL OR submit_burst >= 1)"
            " AND (weight IS NULL OR weight >= 1)",
            name="limits_positive",
        ),
        Index("ix_tenants_paused", "tenant_id", postgresql_where=text("paused")),
        {
            "comment": "One row per tenant seen. Holds the admin-set tier and limits (NULL = the "
            "settings' default, so changing a default reaches every tenant that never got an "
            "explicit value), the per-tenant waiting counter checked at admission with a "
            "conditional UPDATE (serializes one tenant's submits only, never all submits), and "
            "the tenant's submit token bucket (same row, same UPDATE, no extra write)."
        },
    )

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tier: Mapped[int | None] = mapped_column(
        SmallInteger, comment="Admin-set tier (Tier enum); NULL = the tier claimed by the token."
    )
    claimed_tier: Mapped[int | None] = mapped_column(
        SmallInteger, comment="Tier claimed by the latest submit's token (used when tier is NULL)."
    )
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    max_waiting: Mapped[int | None] = mapped_column(Integer)
    submit_rate: Mapped[float | None] = mapped_column(Double)
    submit_burst: Mapped[int | None] = mapped_column(Integer)
    weight: Mapped[int | None] = mapped_column(Integer)
    waiting: Mapped[int] = mapped_column(
        Integer,
        server_default=text("0"),
        comment="Queued tasks of the tenant: +n at admission, -n at dispatch, cancel and expiry, "
        "in the same transactions; repaired by the leader's reconcile if it ever drifts.",
    )
    tokens: Mapped[float] = mapped_column(
        Double, server_default=text("0"), comment="Submit token bucket level at tokens_at."
    )
    tokens_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    paused: Mapped[bool] = mapped_column(
        Boolean,
        server_default=text("false"),
        comment="An operator paused the tenant: its tasks are accepted but none is dispatched.",
    )
    paused_reason: Mapped[str | None] = mapped_column(Text)
    paused_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Task(Base):
    """A task: what to run, where it is in its lifecycle, and its precomputed dispatch rank."""

    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(between("status", STATUS_NAME), name="status_range"),
        CheckConstraint(between("kind", KIND_NAME), name="kind_range"),
        CheckConstraint(between("priority", PRIORITY_NAME), name="priority_range"),
        CheckConstraint(between("tier", TIER_NAME), name="tier_range"),
        CheckConstraint("progress BETWEEN 0 AND 100", name="progress_range"),
        CheckConstraint("progress < 100 OR status = 4", name="progress_100_only_succeeded"),
        CheckConstraint("max_attempts BETWEEN 1 AND 100", name="max_attempts_range"),
        CheckConstraint(
            "attempt >= 0 AND attempt_base >= 0 AND attempt - attempt_base <= max_attempts",
            name="attempts_bounded",
        ),
        CheckConstraint("slot_cost >= 1", name="slot_cost_positive"),
        CheckConstraint(
            "(status IN (4, 5, 6, 7, 8)) = (finished_at IS NOT NULL)",
            name="finished_iff_terminal",
        ),
        CheckConstraint(
            "(status IN (2, 3)) = (submit_state IS NOT NULL)", name="submit_state_iff_active"
        ),
        CheckConstraint(
            "submit_state IS NULL OR submit_state BETWEEN 1 AND 4", name="submit_range"
        ),
        Index(
            "ix_tasks_dispatch",
            "tenant_id",
            text("rank DESC"),
            "enqueued_at",
            postgresql_where=text("status = 1"),
        ),
        Index(
            "ix_tasks_position",
            "kind",
            text("rank DESC"),
            "enqueued_at",
            postgresql_where=text("status = 1"),
        ),
        Index("ix_tasks_tenant_created", "tenant_id", text("created_at DESC"), text("id DESC")),
        Index("ix_tasks_active", "dispatched_at", postgresql_where=text("status IN (2, 3)")),
        Index(
            "ix_tasks_awaiting_adapter",
            "dispatched_at",
            postgresql_where=text("status = 2 AND submit_state = 1"),
        ),
        Index(
            "ix_tasks_queue_deadline",
            "queue_deadline",
            postgresql_where=text("status = 1 AND queue_deadline IS NOT NULL"),
        ),
        Index(
            "ix_tasks_backoff",
            "not_before",
            postgresql_where=text("status = 1 AND not_before IS NOT NULL"),
        ),
        Index(
            "ix_tasks_group",
            "group_id",
            "group_index",
            postgresql_where=text("group_id IS NOT NULL"),
        ),
        Index(
            "ix_tasks_dead_lettered", text("finished_at DESC"), postgresql_where=text("status = 7")
        ),
        Index(
            "ix_tasks_recent_success",
            "kind",
            text("finished_at DESC"),
            postgresql_where=text("status = 4"),
        ),
        {
            "comment": "Every task and its lifecycle. Only the scheduler writes it. rank is a "
            "time-invariant dispatch sort key: effective priority = class + tier boost + "
            "aging_rate * waited, and since aging is linear in enqueued_at with one rate for all "
            "tasks, rank = class + boost - aging_rate * enqueued_at differs from it by a term "
            "common to all tasks, so it can be stored and indexed. enqueued_at is the first "
            "enqueue: a retry keeps its place in line."
        },
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        Text, ForeignKey("tenants.tenant_id", name="fk_tasks_tenant_id_tenants"), nullable=False
    )
    request_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[int] = mapped_column(SmallInteger)
    model: Mapped[str] = mapped_column(Text, comment="Model or deployment reference.")
    is_deployment: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    input: Mapped[dict[str, Any]] = mapped_column(JSONB)
    priority: Mapped[int] = mapped_column(SmallInteger)
    tier: Mapped[int] = mapped_column(SmallInteger, comment="Tenant tier at submit.")
    status: Mapped[int] = mapped_column(SmallInteger)
    progress: Mapped[int] = mapped_column(SmallInteger, server_default=text("0"))
    attempt: Mapped[int] = mapped_column(
        Integer,
        server_default=text("0"),
        comment="Dispatch count, the fencing token of every adapter call and provider result. "
        "Never decreases, also across a redrive.",
    )
    attempt_base: Mapped[int] = mapped_column(
        Integer,
        server_default=text("0"),
        comment="Attempts used before the last redrive: attempts left = max_attempts - "
        "(attempt - attempt_base).",
    )
    max_attempts: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(
        Integer,
        server_default=text("0"),
        comment="Redrive count: each redrive starts a generation that may end in one terminal "
        "event (see task_events).",
    )
    prediction_id: Mapped[str | None] = mapped_column(Text)
    submit_state: Mapped[int | None] = mapped_column(
        SmallInteger,
        comment="SubmitState of the attempt in flight (reliability.md 2.5): 1 dispatched, "
        "2 submitting, 3 unknown, 4 submitted. NULL while not dispatched/running.",
    )
    submit_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    queue_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    run_timeout_s: Mapped[int] = mapped_column(Integer)
    run_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    not_before: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), comment="A retry's backoff: not dispatched before this."
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dispatch_emitted_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True),
        comment="Last time a DispatchTask was written for the attempt (rescue re-emits it).",
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_provider_update_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result: Mapped[bytes | None] = mapped_column(LargeBinary, comment="Serialized TaskResult.")
    error_code: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    error_retryable: Mapped[bool | None] = mapped_column(Boolean)
    last_sequence: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    labels: Mapped[dict[str, str]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[int] | None] = mapped_column(ARRAY(SmallInteger))
    traceparent: Mapped[str | None] = mapped_column(
        Text,
        comment="W3C traceparent of the submit: every record about the task carries its trace.",
    )
    slot_cost: Mapped[int] = mapped_column(SmallInteger)
    rank: Mapped[float] = mapped_column(Double)
    # Task groups and per-task retry delays (revision 0004_groups; see conveyor_scheduler.groups).
    group_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid,
        ForeignKey("task_groups.id", name="fk_tasks_group_id_task_groups", ondelete="SET NULL"),
        comment="The group of a group child; NULL for a task submitted alone.",
    )
    group_index: Mapped[int | None] = mapped_column(Integer, comment="Position in its group.")
    retry_backoff: Mapped[int | None] = mapped_column(
        SmallInteger, comment="RetryBackoff of the task's retry policy; NULL = the default."
    )
    retry_delay_s: Mapped[float | None] = mapped_column(Double)
    retry_max_delay_s: Mapped[float | None] = mapped_column(Double)


class IdempotencyKey(Base):
    """A (tenant, request_id) seen at submit, with the fingerprint of the request body."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        Index("ix_idempotency_keys_expires_at", "expires_at"),
        {
            "comment": "Idempotent submits. The primary key resolves concurrent duplicates: the "
            "second INSERT ... ON CONFLICT DO NOTHING waits for the first to commit and then reads "
            "its task. A repeated key with another body (fingerprint) is FAILED_PRECONDITION. "
            "Keys expire so the table stays bounded."
        },
    )

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    request_id: Mapped[str] = mapped_column(Text, primary_key=True)
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary)
    task_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TaskEventRow(Base):
    """One event of a task's append-only history."""

    __tablename__ = "task_events"
    __table_args__ = (
        Index(
            "uq_task_events_one_terminal",
            "task_id",
            "generation",
            unique=True,
            postgresql_where=text("terminal"),
        ),
        CheckConstraint("sequence >= 1", name="sequence_positive"),
        CheckConstraint("type BETWEEN 1 AND 12", name="type_range"),
        {
            "comment": "Append-only history, sequence 1, 2, 3... per task without gaps (the "
            "task row's last_sequence is bumped in the same transaction, under its row lock). "
            "Watch resume reads it. The partial unique index allows one terminal event per task "
            "and generation: a second terminal transition is a bug and fails the transaction; a "
            "redrive starts the next generation."
        },
    )

    task_id: Mapped[uuid.UUID] = mapped_column(
        Uuid,
        ForeignKey("tasks.id", name="fk_task_events_task_id_tasks", ondelete="CASCADE"),
        primary_key=True,
    )
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    type: Mapped[int] = mapped_column(SmallInteger)
    generation: Mapped[int] = mapped_column(Integer)
    terminal: Mapped[bool] = mapped_column(Boolean)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    payload: Mapped[bytes] = mapped_column(LargeBinary, comment="Serialized TaskEvent.")


class OutboxRow(Base):
    """A Kafka record written in the same transaction as the state change it announces."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
        Index(
            "ix_outbox_published_at",
            "published_at",
            postgresql_where=text("published_at IS NOT NULL"),
        ),
        {
            "comment": "Transactional outbox: state change and event commit together; the leader's "
            "relay publishes unpublished rows in id order (FOR UPDATE SKIP LOCKED, never a "
            "'position > last' cursor, which skips rows committed out of order) with an "
            "idempotent producer, then marks them. At least once: consumers dedupe on event_id "
            "(the ce_id)."
        },
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    topic: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(Text)
    ce_type: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, str]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class InboxRow(Base):
    """A provider result already applied."""

    __tablename__ = "inbox"
    __table_args__ = (
        Index("ix_inbox_received_at", "received_at"),
        {
            "comment": "Idempotent consumption of provider results: the result's id is inserted "
            "in the transaction that applies it; a redelivery conflicts and is skipped."
        },
    )

    consumer: Mapped[str] = mapped_column(Text, primary_key=True)
    event_id: Mapped[str] = mapped_column(Text, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class ActiveSlot(Base):
    """Slots held by one dispatched or running task."""

    __tablename__ = "active_slots"
    __table_args__ = (
        CheckConstraint("cost >= 1", name="cost_positive"),
        {
            "comment": "The truth of concurrency accounting. A row is inserted by the leader's "
            "dispatch transaction (on the connection holding the leader lock, so only one writer "
            "ever adds slots) and deleted when the provider side is terminal, in the transaction "
            "that records it - never because a local lease expired. It holds at most "
            "global-limit rows, so aggregating it per cycle is cheap and there is no hot counter "
            "row."
        },
    )

    task_id: Mapped[uuid.UUID] = mapped_column(
        Uuid,
        ForeignKey("tasks.id", name="fk_active_slots_task_id_tasks", ondelete="CASCADE"),
        primary_key=True,
    )
    tenant_id: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    kind: Mapped[int] = mapped_column(SmallInteger)
    cost: Mapped[int] = mapped_column(SmallInteger)
    provider: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class QueueCounter(Base):
    """One shard of the global waiting count."""

    __tablename__ = "queue_counters"
    __table_args__ = (
        CheckConstraint(f"shard BETWEEN 0 AND {QUEUE_SHARDS - 1}", name="shard_range"),
        {
            "comment": "Global waiting count split over 16 rows so concurrent submits rarely "
            "touch the same row (a single counter row would be a hot spot). The admission check "
            "sums the shards without locking them, so simultaneous submits can overshoot the "
            "capacity by at most the number in flight: acceptable for a capacity guard. A shard "
            "may go negative (decrements land on any shard); only the sum means anything."
        },
    )

    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    waiting: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
