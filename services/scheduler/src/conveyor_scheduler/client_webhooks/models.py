"""Client webhook state: per-tenant signing secrets, endpoints, deliveries and their attempts.

The notifier has no database; it leases deliveries through ``DeliveryCoordinationService`` and
reports outcomes, and this schema keeps everything durable. Tables live on the scheduler's metadata
(``conveyor_scheduler.store.models.Base``) and are created by revision ``0002_webhooks``.

Delivery states are ``conveyor.tasks.v1.DeliveryState`` numbers: 1 pending, 2 delivered, 3 failed.
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
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    Text,
    Uuid,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from conveyor_scheduler.store.models import Base

PENDING, DELIVERED, FAILED = 1, 2, 3


def _now() -> Any:
    return text("now()")


class WebhookSecret(Base):
    """A tenant's Standard Webhooks signing secret, and the previous one during a rotation."""

    __tablename__ = "webhook_secrets"
    __table_args__ = (
        CheckConstraint(
            "(previous_secret IS NULL) = (previous_valid_until IS NULL)", name="previous_pair"
        ),
        {
            "comment": "One whsec_ secret per tenant signs every delivery to its endpoints. A "
            "rotation keeps the previous secret signing alongside (two v1 signatures) until "
            "previous_valid_until, so receivers can switch without losing deliveries. Stored in "
            "clear: encrypting at rest with a key from settings is a follow-up."
        },
    )

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    current_secret: Mapped[str] = mapped_column(Text)
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_valid_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rotate_request_id: Mapped[str | None] = mapped_column(
        Text, comment="Idempotency key of the latest rotation (a replay does not rotate again)."
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookEndpoint(Base):
    """A callback URL of a tenant (all its tasks and groups), of one task (TaskSpec.webhook) or of
    one group (GroupSpec.webhook)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        CheckConstraint("enabled = (disabled_at IS NULL)", name="disabled_iff_not_enabled"),
        CheckConstraint("consecutive_failures >= 0", name="failures_nonneg"),
        Index(
            "uq_webhook_endpoints_request",
            "tenant_id",
            "request_id",
            unique=True,
            postgresql_where=text("request_id IS NOT NULL"),
        ),
        Index(
            "uq_webhook_endpoints_task",
            "tenant_id",
            "task_id",
            unique=True,
            postgresql_where=text("task_id IS NOT NULL"),
        ),
        Index(
            "uq_webhook_endpoints_group",
            "tenant_id",
            "group_id",
            unique=True,
            postgresql_where=text("group_id IS NOT NULL"),
        ),
        Index(
            "ix_webhook_endpoints_tenant_live",
            "tenant_id",
            postgresql_where=text("deleted_at IS NULL AND task_id IS NULL"),
        ),
        {
            "comment": "Registered endpoints (task_id NULL: every task of the tenant) and per-task "
            "endpoints created from a task's own webhook (task_id set; one per task). The URL "
            "passed the SSRF policy at registration; the notifier checks it again at connect "
            "time. An endpoint failing too long is disabled (enabled false + reason), a deleted "
            "one keeps its row (deleted_at) so the delivery log stays readable."
        },
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(Text)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[int]] = mapped_column(
        ARRAY(SmallInteger),
        server_default=text("'{}'::smallint[]"),
        comment="TaskEventType numbers delivered; empty = terminal events only.",
    )
    group_event_types: Mapped[list[int]] = mapped_column(
        ARRAY(SmallInteger),
        server_default=text("'{}'::smallint[]"),
        comment="GroupEventType numbers delivered; empty = GROUP_EVENT_TYPE_COMPLETED only.",
    )
    group_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid,
        comment="Set for a group's own endpoint (GroupSpec.webhook): that group's events only.",
    )
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    request_id: Mapped[str | None] = mapped_column(Text)
    consecutive_failures: Mapped[int] = mapped_column(
        Integer,
        server_default=text("0"),
        comment="Failed attempts since the last success (the notifier's disable rule reads it).",
    )
    failing_since: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True),
        comment="Start of the current run of failures; NULL after a success.",
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class WebhookDelivery(Base):
    """One task event to one endpoint; its id is the ``webhook-id`` header, stable across retries."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("state BETWEEN 1 AND 3", name="state_range"),
        CheckConstraint("(state = 1) = (next_attempt_at IS NOT NULL)", name="due_iff_pending"),
        CheckConstraint(
            "(state = 2) = (delivered_at IS NOT NULL)", name="delivered_at_iff_delivered"
        ),
        CheckConstraint("attempts >= 0", name="attempts_nonneg"),
        Index(
            "uq_webhook_deliveries_endpoint_event",
            "endpoint_id",
            "event_id",
            unique=True,
        ),
        Index(
            "ix_webhook_deliveries_order",
            "endpoint_id",
            "task_id",
            "sequence",
            postgresql_where=text("state = 1"),
        ),
        Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where=text("state = 1")),
        Index(
            "ix_webhook_deliveries_tenant_created",
            "tenant_id",
            text("created_at DESC"),
            text("id DESC"),
        ),
        Index(
            "ix_webhook_deliveries_tenant_task",
            "tenant_id",
            "task_id",
            text("created_at DESC"),
        ),
        {
            "comment": "The durable delivery queue and log. (endpoint_id, event_id) is unique, so a "
            "redelivered task event creates nothing new. Claims lease at most the lowest-sequence "
            "pending delivery per (endpoint, task): a task's events reach an endpoint in order. "
            "A lease (lease_owner, lease_until) that expires lets another notifier resend the "
            "delivery with the same id (at least once)."
        },
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    task_id: Mapped[str] = mapped_column(Text)
    event_id: Mapped[str] = mapped_column(Text)
    sequence: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[int] = mapped_column(SmallInteger)
    event: Mapped[bytes] = mapped_column(
        LargeBinary, comment="Serialized TaskEvent (GroupEvent when group_id is set)."
    )
    group_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid,
        comment="Set for a delivery of a group event: event is a GroupEvent, event_type a "
        "GroupEventType number and task_id the group id (per-group order).",
    )
    state: Mapped[int] = mapped_column(SmallInteger, server_default=text("1"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookAttempt(Base):
    """One attempt of a delivery (the detailed delivery log)."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        {"comment": "Every attempt with its outcome, for support and the delivery log."},
    )

    delivery_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[str] = mapped_column(Text)
    delivered: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    attempted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
