"""Task groups (task_groups, group_events, tasks.group_id/group_index) and per-task retry delays.

See conveyor_scheduler.groups.models for why each table and constraint exists (the comments are in
the catalog too). Delayed tasks need no schema: tasks.not_before and ix_tasks_backoff already exist.

Revision ID: 0004_groups
Revises: 0003_task_traceparent
Create Date: 2026-12-04 23:52:12.247206+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_groups"
down_revision: str | None = "0003_task_traceparent"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_groups",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column(
            "fingerprint", sa.LargeBinary(), nullable=False, comment="sha256 of the GroupSpec."
        ),
        sa.Column("status", sa.SmallInteger(), nullable=False, comment="GroupStatus number."),
        sa.Column("policy", sa.SmallInteger(), nullable=False, comment="GroupPolicy number."),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("succeeded", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("failed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("canceled", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("running", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("queued", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "progress_sum",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Sum of the children's progress (a terminal child counts 100).",
        ),
        sa.Column(
            "cancel_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column(
            "cancel_pending",
            sa.Boolean(),
            server_default=sa.text("false"),
            nullable=False,
            comment="Children still to cancel.",
        ),
        sa.Column("cancel_reason", sa.Text(), nullable=True),
        sa.Column(
            "follow_up",
            sa.LargeBinary(),
            nullable=True,
            comment="Serialized GroupFollowUp, when one is configured.",
        ),
        sa.Column("follow_up_task_id", sa.Uuid(), nullable=True),
        sa.Column(
            "labels",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("last_sequence", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status IN (2, 3, 4, 5)) = (finished_at IS NOT NULL)",
            name=op.f("ck_task_groups_finished_iff_terminal"),
        ),
        sa.CheckConstraint("policy BETWEEN 1 AND 2", name=op.f("ck_task_groups_policy_range")),
        sa.CheckConstraint("status BETWEEN 1 AND 5", name=op.f("ck_task_groups_status_range")),
        sa.CheckConstraint(
            "total >= 1 AND done >= 0 AND done <= total AND succeeded + failed + canceled = done AND running >= 0 AND queued >= 0 AND running + queued + done = total",
            name=op.f("ck_task_groups_counts_consistent"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_groups")),
        sa.UniqueConstraint("tenant_id", "request_id", name="uq_task_groups_tenant_id_request_id"),
        comment="Task groups. The counters are recomputed from the children (tasks.group_id) in the transaction of every child change, under this row's lock, so they are exact. cancel_pending marks children still to cancel (group cancel, fail-fast) and a succeeded group with follow_up and no follow_up_task_id still owes its fan-in task: the group worker finishes both (ix_task_groups_work), so a crash between the two steps loses nothing. (tenant_id, request_id) makes CreateGroup idempotent.",
    )
    op.create_index(
        "ix_task_groups_tenant_created",
        "task_groups",
        ["tenant_id", sa.literal_column("created_at DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index(
        "ix_task_groups_work",
        "task_groups",
        ["id"],
        unique=False,
        postgresql_where=sa.text(
            "(cancel_pending AND status = 1) OR (status = 2 AND follow_up IS NOT NULL AND follow_up_task_id IS NULL)"
        ),
    )
    op.create_table(
        "group_events",
        sa.Column("group_id", sa.Uuid(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column(
            "event_id",
            sa.Uuid(),
            nullable=False,
            comment="UUIDv7 (no unique index: one index write less per child event).",
        ),
        sa.Column("type", sa.SmallInteger(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "payload",
            sa.LargeBinary(),
            nullable=False,
            comment="Serialized GroupEvent (without child_event: see child_task_id).",
        ),
        sa.Column(
            "child_task_id",
            sa.Uuid(),
            nullable=True,
            comment="A CHILD event's child: its event is task_events (child_task_id, "
            "child_sequence), read with the group's history, never copied.",
        ),
        sa.Column("child_sequence", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("sequence >= 1", name=op.f("ck_group_events_sequence_positive")),
        sa.CheckConstraint("type BETWEEN 1 AND 5", name=op.f("ck_group_events_type_range")),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["task_groups.id"],
            name="fk_group_events_group_id_task_groups",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "sequence", name=op.f("pk_group_events")),
        comment="A group's history, sequence 1, 2, 3... per group without gaps (bumped on the group row under its lock in the same transaction): every child event, the group's progress after it, its completion with every child's outputs. WatchGroup resumes from it.",
    )
    op.add_column(
        "tasks",
        sa.Column(
            "group_id",
            sa.Uuid(),
            nullable=True,
            comment="The group of a group child; NULL for a task submitted alone.",
        ),
    )
    op.add_column(
        "tasks",
        sa.Column("group_index", sa.Integer(), nullable=True, comment="Position in its group."),
    )
    op.add_column(
        "tasks",
        sa.Column(
            "retry_backoff",
            sa.SmallInteger(),
            nullable=True,
            comment="RetryBackoff of the task's retry policy; NULL = the default.",
        ),
    )
    op.add_column("tasks", sa.Column("retry_delay_s", sa.Double(), nullable=True))
    op.add_column("tasks", sa.Column("retry_max_delay_s", sa.Double(), nullable=True))
    op.create_index(
        "ix_tasks_group",
        "tasks",
        ["group_id", "group_index"],
        unique=False,
        postgresql_where=sa.text("group_id IS NOT NULL"),
    )
    op.create_foreign_key(
        "fk_tasks_group_id_task_groups",
        "tasks",
        "task_groups",
        ["group_id"],
        ["id"],
        ondelete="SET NULL",
    )


def downgrade() -> None:
    op.drop_constraint("fk_tasks_group_id_task_groups", "tasks", type_="foreignkey")
    op.drop_index(
        "ix_tasks_group", table_name="tasks", postgresql_where=sa.text("group_id IS NOT NULL")
    )
    op.drop_column("tasks", "retry_max_delay_s")
    op.drop_column("tasks", "retry_delay_s")
    op.drop_column("tasks", "retry_backoff")
    op.drop_column("tasks", "group_index")
    op.drop_column("tasks", "group_id")
    op.drop_table("group_events")
    op.drop_index(
        "ix_task_groups_work",
        table_name="task_groups",
        postgresql_where=sa.text(
            "(cancel_pending AND status = 1) OR (status = 2 AND follow_up IS NOT NULL AND follow_up_task_id IS NULL)"
        ),
    )
    op.drop_index("ix_task_groups_tenant_created", table_name="task_groups")
    op.drop_table("task_groups")
