"""Core schema: tenants, tasks, idempotency keys, task events, outbox, inbox, controls, slots.

See conveyor_scheduler.store.models for why each table and constraint exists (the comments are in the
catalog too).

Revision ID: 0001_core
Revises:
Create Date: 2026-11-23 05:40:22.494169+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_core"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.LargeBinary(), nullable=False),
        sa.Column("task_id", sa.Uuid(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "request_id", name=op.f("pk_idempotency_keys")),
        comment="Idempotent submits. The primary key resolves concurrent duplicates: the second INSERT ... ON CONFLICT DO NOTHING waits for the first to commit and then reads its task. A repeated key with another body (fingerprint) is FAILED_PRECONDITION. Keys expire so the table stays bounded.",
    )
    op.create_index(
        "ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"], unique=False
    )
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("consumer", "event_id", name=op.f("pk_inbox")),
        comment="Idempotent consumption of provider results: the result's id is inserted in the transaction that applies it; a redelivery conflicts and is skipped.",
    )
    op.create_index("ix_inbox_received_at", "inbox", ["received_at"], unique=False)
    op.create_table(
        "model_controls",
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_model_controls")),
        comment="Paused models are skipped by the dispatcher; their queued tasks wait.",
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("ce_type", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column(
            "headers",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_event_id")),
        comment="Transactional outbox: state change and event commit together; the leader's relay publishes unpublished rows in id order (FOR UPDATE SKIP LOCKED, never a 'position > last' cursor, which skips rows committed out of order) with an idempotent producer, then marks them. At least once: consumers dedupe on event_id (the ce_id).",
    )
    op.create_index(
        "ix_outbox_published_at",
        "outbox",
        ["published_at"],
        unique=False,
        postgresql_where=sa.text("published_at IS NOT NULL"),
    )
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        unique=False,
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_table(
        "provider_controls",
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("throttled_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("provider", name=op.f("pk_provider_controls")),
        comment="No dispatch to a provider before throttled_until. Tasks already dispatched keep their slots.",
    )
    op.create_table(
        "queue_counters",
        sa.Column("shard", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("waiting", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint("shard BETWEEN 0 AND 15", name=op.f("ck_queue_counters_shard_range")),
        sa.PrimaryKeyConstraint("shard", name=op.f("pk_queue_counters")),
        comment="Global waiting count split over 16 rows so concurrent submits rarely touch the same row (a single counter row would be a hot spot). The admission check sums the shards without locking them, so simultaneous submits can overshoot the capacity by at most the number in flight: acceptable for a capacity guard. A shard may go negative (decrements land on any shard); only the sum means anything.",
    )
    op.create_table(
        "tenants",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column(
            "tier",
            sa.SmallInteger(),
            nullable=True,
            comment="Admin-set tier (Tier enum); NULL = the tier claimed by the token.",
        ),
        sa.Column(
            "claimed_tier",
            sa.SmallInteger(),
            nullable=True,
            comment="Tier claimed by the latest submit's token (used when tier is NULL).",
        ),
        sa.Column("max_concurrency", sa.Integer(), nullable=True),
        sa.Column("max_waiting", sa.Integer(), nullable=True),
        sa.Column("submit_rate", sa.Double(), nullable=True),
        sa.Column("submit_burst", sa.Integer(), nullable=True),
        sa.Column("weight", sa.Integer(), nullable=True),
        sa.Column(
            "waiting",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Queued tasks of the tenant: +n at admission, -n at dispatch, cancel and expiry, in the same transactions; repaired by the leader's reconcile if it ever drifts.",
        ),
        sa.Column(
            "tokens",
            sa.Double(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Submit token bucket level at tokens_at.",
        ),
        sa.Column(
            "tokens_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
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
            "(max_concurrency IS NULL OR max_concurrency >= 1) AND (max_waiting IS NULL OR max_waiting >= 1) AND (submit_rate IS NULL OR submit_rate > 0) AND (submit_burst IS NULL OR submit_burst >= 1) AND (weight IS NULL OR weight >= 1)",
            name=op.f("ck_tenants_limits_positive"),
        ),
        sa.CheckConstraint(
            "tier IS NULL OR tier BETWEEN 1 AND 3", name=op.f("ck_tenants_tier_range")
        ),
        sa.CheckConstraint("waiting >= 0", name=op.f("ck_tenants_waiting_nonneg")),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_tenants")),
        comment="One row per tenant seen. Holds the admin-set tier and limits (NULL = the settings' default, so changing a default reaches every tenant that never got an explicit value), the per-tenant waiting counter checked at admission with a conditional UPDATE (serializes one tenant's submits only, never all submits), and the tenant's submit token bucket (same row, same UPDATE, no extra write).",
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False, comment="Model or deployment reference."),
        sa.Column("is_deployment", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("input", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("tier", sa.SmallInteger(), nullable=False, comment="Tenant tier at submit."),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("progress", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "attempt",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Dispatch count, the fencing token of every adapter call and provider result. Never decreases, also across a redrive.",
        ),
        sa.Column(
            "attempt_base",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Attempts used before the last redrive: attempts left = max_attempts - (attempt - attempt_base).",
        ),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column(
            "generation",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Redrive count: each redrive starts a generation that may end in one terminal event (see task_events).",
        ),
        sa.Column("prediction_id", sa.Text(), nullable=True),
        sa.Column(
            "submit_state",
            sa.SmallInteger(),
            nullable=True,
            comment="SubmitState of the attempt in flight (reliability.md 2.5): 1 dispatched, 2 submitting, 3 unknown, 4 submitted. NULL while not dispatched/running.",
        ),
        sa.Column("submit_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "cancel_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("cancel_reason", sa.Text(), nullable=True),
        sa.Column("queue_deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_timeout_s", sa.Integer(), nullable=False),
        sa.Column("run_deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "not_before",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="A retry's backoff: not dispatched before this.",
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
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "dispatch_emitted_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="Last time a DispatchTask was written for the attempt (rescue re-emits it).",
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_provider_update_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.LargeBinary(), nullable=True, comment="Serialized TaskResult."),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_retryable", sa.Boolean(), nullable=True),
        sa.Column("last_sequence", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "labels",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("webhook_events", sa.ARRAY(sa.SmallInteger()), nullable=True),
        sa.Column("slot_cost", sa.SmallInteger(), nullable=False),
        sa.Column("rank", sa.Double(), nullable=False),
        sa.CheckConstraint(
            "(status IN (2, 3)) = (submit_state IS NOT NULL)",
            name=op.f("ck_tasks_submit_state_iff_active"),
        ),
        sa.CheckConstraint(
            "(status IN (4, 5, 6, 7, 8)) = (finished_at IS NOT NULL)",
            name=op.f("ck_tasks_finished_iff_terminal"),
        ),
        sa.CheckConstraint(
            "attempt >= 0 AND attempt_base >= 0 AND attempt - attempt_base <= max_attempts",
            name=op.f("ck_tasks_attempts_bounded"),
        ),
        sa.CheckConstraint("kind BETWEEN 1 AND 4", name=op.f("ck_tasks_kind_range")),
        sa.CheckConstraint(
            "max_attempts BETWEEN 1 AND 100", name=op.f("ck_tasks_max_attempts_range")
        ),
        sa.CheckConstraint("priority BETWEEN 1 AND 4", name=op.f("ck_tasks_priority_range")),
        sa.CheckConstraint(
            "progress < 100 OR status = 4", name=op.f("ck_tasks_progress_100_only_succeeded")
        ),
        sa.CheckConstraint("progress BETWEEN 0 AND 100", name=op.f("ck_tasks_progress_range")),
        sa.CheckConstraint("slot_cost >= 1", name=op.f("ck_tasks_slot_cost_positive")),
        sa.CheckConstraint("status BETWEEN 1 AND 8", name=op.f("ck_tasks_status_range")),
        sa.CheckConstraint(
            "submit_state IS NULL OR submit_state BETWEEN 1 AND 4",
            name=op.f("ck_tasks_submit_range"),
        ),
        sa.CheckConstraint("tier BETWEEN 1 AND 3", name=op.f("ck_tasks_tier_range")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name="fk_tasks_tenant_id_tenants"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        comment="Every task and its lifecycle. Only the scheduler writes it. rank is a time-invariant dispatch sort key: effective priority = class + tier boost + aging_rate * waited, and since aging is linear in enqueued_at with one rate for all tasks, rank = class + boost - aging_rate * enqueued_at differs from it by a term common to all tasks, so it can be stored and indexed. enqueued_at is the first enqueue: a retry keeps its place in line.",
    )
    op.create_index(
        "ix_tasks_active",
        "tasks",
        ["dispatched_at"],
        unique=False,
        postgresql_where=sa.text("status IN (2, 3)"),
    )
    op.create_index(
        "ix_tasks_backoff",
        "tasks",
        ["not_before"],
        unique=False,
        postgresql_where=sa.text("status = 1 AND not_before IS NOT NULL"),
    )
    op.create_index(
        "ix_tasks_dead_lettered",
        "tasks",
        [sa.literal_column("finished_at DESC")],
        unique=False,
        postgresql_where=sa.text("status = 7"),
    )
    op.create_index(
        "ix_tasks_dispatch",
        "tasks",
        ["tenant_id", sa.literal_column("rank DESC"), "enqueued_at"],
        unique=False,
        postgresql_where=sa.text("status = 1"),
    )
    op.create_index(
        "ix_tasks_position",
        "tasks",
        ["kind", sa.literal_column("rank DESC"), "enqueued_at"],
        unique=False,
        postgresql_where=sa.text("status = 1"),
    )
    op.create_index(
        "ix_tasks_queue_deadline",
        "tasks",
        ["queue_deadline"],
        unique=False,
        postgresql_where=sa.text("status = 1 AND queue_deadline IS NOT NULL"),
    )
    op.create_index(
        "ix_tasks_recent_success",
        "tasks",
        ["kind", sa.literal_column("finished_at DESC")],
        unique=False,
        postgresql_where=sa.text("status = 4"),
    )
    op.create_index(
        "ix_tasks_tenant_created",
        "tasks",
        ["tenant_id", sa.literal_column("created_at DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_table(
        "active_slots",
        sa.Column("task_id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("cost", sa.SmallInteger(), nullable=False),
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column(
            "acquired_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("cost >= 1", name=op.f("ck_active_slots_cost_positive")),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name="fk_active_slots_task_id_tasks", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_active_slots")),
        comment="The truth of concurrency accounting. A row is inserted by the leader's dispatch transaction (on the connection holding the leader lock, so only one writer ever adds slots) and deleted when the provider side is terminal, in the transaction that records it - never because a local lease expired. It holds at most global-limit rows, so aggregating it per cycle is cheap and there is no hot counter row.",
    )
    op.create_table(
        "task_events",
        sa.Column("task_id", sa.Uuid(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.SmallInteger(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("terminal", sa.Boolean(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False, comment="Serialized TaskEvent."),
        sa.CheckConstraint("sequence >= 1", name=op.f("ck_task_events_sequence_positive")),
        sa.CheckConstraint("type BETWEEN 1 AND 12", name=op.f("ck_task_events_type_range")),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name="fk_task_events_task_id_tasks", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("task_id", "sequence", name=op.f("pk_task_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_task_events_event_id")),
        comment="Append-only history, sequence 1, 2, 3... per task without gaps (the task row's last_sequence is bumped in the same transaction, under its row lock). Watch resume reads it. The partial unique index allows one terminal event per task and generation: a second terminal transition is a bug and fails the transaction; a redrive starts the next generation.",
    )
    op.create_index(
        "uq_task_events_one_terminal",
        "task_events",
        ["task_id", "generation"],
        unique=True,
        postgresql_where=sa.text("terminal"),
    )
    # One row per shard of the global waiting count (see the table comment).
    op.execute(
        "INSERT INTO queue_counters (shard, waiting) SELECT g, 0 FROM generate_series(0, 15) AS g"
    )


def downgrade() -> None:
    op.drop_index(
        "uq_task_events_one_terminal",
        table_name="task_events",
        postgresql_where=sa.text("terminal"),
    )
    op.drop_table("task_events")
    op.drop_table("active_slots")
    op.drop_index("ix_tasks_tenant_created", table_name="tasks")
    op.drop_index(
        "ix_tasks_recent_success", table_name="tasks", postgresql_where=sa.text("status = 4")
    )
    op.drop_index(
        "ix_tasks_queue_deadline",
        table_name="tasks",
        postgresql_where=sa.text("status = 1 AND queue_deadline IS NOT NULL"),
    )
    op.drop_index("ix_tasks_position", table_name="tasks", postgresql_where=sa.text("status = 1"))
    op.drop_index("ix_tasks_dispatch", table_name="tasks", postgresql_where=sa.text("status = 1"))
    op.drop_index(
        "ix_tasks_backoff",
        table_name="tasks",
        postgresql_where=sa.text("status = 1 AND not_before IS NOT NULL"),
    )
    op.drop_index(
        "ix_tasks_dead_lettered", table_name="tasks", postgresql_where=sa.text("status = 7")
    )
    op.drop_index(
        "ix_tasks_active", table_name="tasks", postgresql_where=sa.text("status IN (2, 3)")
    )
    op.drop_table("tasks")
    op.drop_table("tenants")
    op.drop_table("queue_counters")
    op.drop_table("provider_controls")
    op.drop_index(
        "ix_outbox_unpublished",
        table_name="outbox",
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.drop_index(
        "ix_outbox_published_at",
        table_name="outbox",
        postgresql_where=sa.text("published_at IS NOT NULL"),
    )
    op.drop_table("outbox")
    op.drop_table("model_controls")
    op.drop_index("ix_inbox_received_at", table_name="inbox")
    op.drop_table("inbox")
    op.drop_index("ix_idempotency_keys_expires_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
