"""A group's CHILD events are stored as columns (the group's counters after the child's event), not
as a serialized GroupEvent: the aggregate hook writes them in the statement that updates the group,
and the reader builds the GroupEvent.

(A downgrade needs the CHILD events stored as columns gone first: payload becomes NOT NULL again.)

Revision ID: 0008_group_child_event_columns
Revises: 0007_group_webhooks
Create Date: 2026-12-05 10:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_group_child_event_columns"
down_revision: str | None = "0007_group_webhooks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTS = ("done", "succeeded", "failed", "canceled", "running", "queued")


_OLD_TABLE_COMMENT = (
    "Task groups. The counters are recomputed from the children (tasks.group_id) "
    "in the transaction of every child change, under this row's lock, so they are exact. "
    "cancel_pending marks children still to cancel (group cancel, fail-fast) and a "
    "succeeded group with follow_up and no follow_up_task_id still owes its fan-in task: "
    "the group worker finishes both (ix_task_groups_work), so a crash between the two "
    "steps loses nothing. (tenant_id, request_id) makes CreateGroup idempotent."
)
_NEW_TABLE_COMMENT = (
    "Task groups. Every child change applies its difference to the counters in "
    "its transaction, under this row's lock (a group's last change recounts the children "
    "first), so they are exact. "
    "cancel_pending marks children still to cancel (group cancel, fail-fast) and a "
    "succeeded group with follow_up and no follow_up_task_id still owes its fan-in task: "
    "the group worker finishes both (ix_task_groups_work), so a crash between the two "
    "steps loses nothing. (tenant_id, request_id) makes CreateGroup idempotent."
)
_GROUP_ID_COMMENT = (
    "No foreign key (a check per child event costs more than the rest of its write): "
    "events are appended only under the group's row lock, and a purge deletes both."
)


def upgrade() -> None:
    op.create_table_comment("task_groups", _NEW_TABLE_COMMENT, existing_comment=_OLD_TABLE_COMMENT)
    op.drop_constraint("fk_group_events_group_id_task_groups", "group_events", type_="foreignkey")
    op.alter_column("group_events", "group_id", existing_type=sa.Uuid(), comment=_GROUP_ID_COMMENT)
    op.alter_column(
        "group_events",
        "payload",
        existing_type=sa.LargeBinary(),
        nullable=True,
        comment="Serialized GroupEvent (without child_event: see child_task_id); NULL for a CHILD "
        "event stored as columns (snap_*).",
        existing_comment="Serialized GroupEvent (without child_event: see child_task_id).",
    )
    op.alter_column(
        "group_events",
        "event_id",
        existing_type=sa.Uuid(),
        comment="UUIDv7, or v4 for a CHILD event (no unique index: one index write less per child "
        "event).",
        existing_comment="UUIDv7 (no unique index: one index write less per child event).",
    )
    op.add_column(
        "group_events",
        sa.Column(
            "snap_status",
            sa.SmallInteger(),
            nullable=True,
            comment="A CHILD event without payload: the group's status after the child's event.",
        ),
    )
    for name in _COUNTS:
        op.add_column("group_events", sa.Column(f"snap_{name}", sa.Integer(), nullable=True))
    op.add_column("group_events", sa.Column("snap_progress_sum", sa.BigInteger(), nullable=True))
    op.add_column("group_events", sa.Column("snap_cancel_requested", sa.Boolean(), nullable=True))
    op.create_check_constraint(
        op.f("ck_group_events_payload_or_snapshot"),
        "group_events",
        "payload IS NOT NULL OR (type = 2 AND snap_status IS NOT NULL)",
    )


def downgrade() -> None:
    op.alter_column(
        "group_events",
        "group_id",
        existing_type=sa.Uuid(),
        comment=None,
        existing_comment=_GROUP_ID_COMMENT,
    )
    op.create_foreign_key(
        "fk_group_events_group_id_task_groups",
        "group_events",
        "task_groups",
        ["group_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.create_table_comment("task_groups", _OLD_TABLE_COMMENT, existing_comment=_NEW_TABLE_COMMENT)
    op.drop_constraint(op.f("ck_group_events_payload_or_snapshot"), "group_events", type_="check")
    op.drop_column("group_events", "snap_cancel_requested")
    op.drop_column("group_events", "snap_progress_sum")
    for name in _COUNTS:
        op.drop_column("group_events", f"snap_{name}")
    op.drop_column("group_events", "snap_status")
    op.alter_column(
        "group_events",
        "event_id",
        existing_type=sa.Uuid(),
        comment="UUIDv7 (no unique index: one index write less per child event).",
    )
    op.alter_column(
        "group_events",
        "payload",
        existing_type=sa.LargeBinary(),
        nullable=False,
        comment="Serialized GroupEvent (without child_event: see child_task_id).",
    )
