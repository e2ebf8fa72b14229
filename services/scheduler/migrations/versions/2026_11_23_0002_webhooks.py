"""Client webhooks: per-tenant signing secrets, endpoints, deliveries and their attempts.

See conveyor_scheduler.client_webhooks.models for why each table and constraint exists (the comments are in
the catalog too).

Revision ID: 0002_webhooks
Revises: 0001_core
Create Date: 2026-11-23 05:48:23.270958+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_webhooks"
down_revision: str | None = "0001_core"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("task_id", sa.Text(), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column(
            "event_types",
            sa.ARRAY(sa.SmallInteger()),
            server_default=sa.text("'{}'::smallint[]"),
            nullable=False,
            comment="TaskEventType numbers delivered; empty = terminal events only.",
        ),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column(
            "consecutive_failures",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Failed attempts since the last success (the notifier's disable rule reads it).",
        ),
        sa.Column(
            "failing_since",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="Start of the current run of failures; NULL after a success.",
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "consecutive_failures >= 0", name=op.f("ck_webhook_endpoints_failures_nonneg")
        ),
        sa.CheckConstraint(
            "enabled = (disabled_at IS NULL)",
            name=op.f("ck_webhook_endpoints_disabled_iff_not_enabled"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
        comment="Registered endpoints (task_id NULL: every task of the tenant) and per-task endpoints created from a task's own webhook (task_id set; one per task). The URL passed the SSRF policy at registration; the notifier checks it again at connect time. An endpoint failing too long is disabled (enabled false + reason), a deleted one keeps its row (deleted_at) so the delivery log stays readable.",
    )
    op.create_index(
        "ix_webhook_endpoints_tenant_live",
        "webhook_endpoints",
        ["tenant_id"],
        unique=False,
        postgresql_where=sa.text("deleted_at IS NULL AND task_id IS NULL"),
    )
    op.create_index(
        "uq_webhook_endpoints_request",
        "webhook_endpoints",
        ["tenant_id", "request_id"],
        unique=True,
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    op.create_index(
        "uq_webhook_endpoints_task",
        "webhook_endpoints",
        ["tenant_id", "task_id"],
        unique=True,
        postgresql_where=sa.text("task_id IS NOT NULL"),
    )
    op.create_table(
        "webhook_secrets",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("current_secret", sa.Text(), nullable=False),
        sa.Column("previous_secret", sa.Text(), nullable=True),
        sa.Column("previous_valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "rotate_request_id",
            sa.Text(),
            nullable=True,
            comment="Idempotency key of the latest rotation (a replay does not rotate again).",
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(previous_secret IS NULL) = (previous_valid_until IS NULL)",
            name=op.f("ck_webhook_secrets_previous_pair"),
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_webhook_secrets")),
        comment="One whsec_ secret per tenant signs every delivery to its endpoints. A rotation keeps the previous secret signing alongside (two v1 signatures) until previous_valid_until, so receivers can switch without losing deliveries. Stored in clear: encrypting at rest with a key from settings is a follow-up.",
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), nullable=False),
        sa.Column("task_id", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.SmallInteger(), nullable=False),
        sa.Column("event", sa.LargeBinary(), nullable=False, comment="Serialized TaskEvent."),
        sa.Column("state", sa.SmallInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(state = 1) = (next_attempt_at IS NOT NULL)",
            name=op.f("ck_webhook_deliveries_due_iff_pending"),
        ),
        sa.CheckConstraint(
            "(state = 2) = (delivered_at IS NOT NULL)",
            name=op.f("ck_webhook_deliveries_delivered_at_iff_delivered"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_webhook_deliveries_attempts_nonneg")),
        sa.CheckConstraint("state BETWEEN 1 AND 3", name=op.f("ck_webhook_deliveries_state_range")),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_webhook_deliveries_endpoint_id_webhook_endpoints"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        comment="The durable delivery queue and log. (endpoint_id, event_id) is unique, so a redelivered task event creates nothing new. Claims lease at most the lowest-sequence pending delivery per (endpoint, task): a task's events reach an endpoint in order. A lease (lease_owner, lease_until) that expires lets another notifier resend the delivery with the same id (at least once).",
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("state = 1"),
    )
    op.create_index(
        "ix_webhook_deliveries_order",
        "webhook_deliveries",
        ["endpoint_id", "task_id", "sequence"],
        unique=False,
        postgresql_where=sa.text("state = 1"),
    )
    op.create_index(
        "ix_webhook_deliveries_tenant_created",
        "webhook_deliveries",
        ["tenant_id", sa.literal_column("created_at DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index(
        "ix_webhook_deliveries_tenant_task",
        "webhook_deliveries",
        ["tenant_id", "task_id", sa.literal_column("created_at DESC")],
        unique=False,
    )
    op.create_index(
        "uq_webhook_deliveries_endpoint_event",
        "webhook_deliveries",
        ["endpoint_id", "event_id"],
        unique=True,
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("delivery_id", sa.Uuid(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=False),
        sa.Column("delivered", sa.Boolean(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "attempted_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name=op.f("fk_webhook_attempts_delivery_id_webhook_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("delivery_id", "attempt", name=op.f("pk_webhook_attempts")),
        comment="Every attempt with its outcome, for support and the delivery log.",
    )


def downgrade() -> None:
    op.drop_table("webhook_attempts")
    op.drop_index("uq_webhook_deliveries_endpoint_event", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_tenant_task", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_tenant_created", table_name="webhook_deliveries")
    op.drop_index(
        "ix_webhook_deliveries_order",
        table_name="webhook_deliveries",
        postgresql_where=sa.text("state = 1"),
    )
    op.drop_index(
        "ix_webhook_deliveries_due",
        table_name="webhook_deliveries",
        postgresql_where=sa.text("state = 1"),
    )
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_secrets")
    op.drop_index(
        "uq_webhook_endpoints_task",
        table_name="webhook_endpoints",
        postgresql_where=sa.text("task_id IS NOT NULL"),
    )
    op.drop_index(
        "uq_webhook_endpoints_request",
        table_name="webhook_endpoints",
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    op.drop_index(
        "ix_webhook_endpoints_tenant_live",
        table_name="webhook_endpoints",
        postgresql_where=sa.text("deleted_at IS NULL AND task_id IS NULL"),
    )
    op.drop_table("webhook_endpoints")
