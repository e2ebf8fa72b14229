"""The schema of task groups (same metadata as the core models; revision 0004_groups builds it).

A group's children are ordinary rows of ``tasks`` (``tasks.group_id``, ``tasks.group_index``): they
are admitted, ranked, aged, fair-shared and limited exactly like tasks submitted alone. The group row
holds the aggregate, recomputed from its children in every transaction that changes one of them
(under the group row's lock), so it can never drift from the children, also across a crash.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from conveyor_common.vocabulary import GROUP_POLICY_NAME, GROUP_STATUS_NAME, between
from conveyor_scheduler.store.models import Base


class TaskGroup(Base):
    """A group of tasks submitted together, and its aggregate."""

    __tablename__ = "task_groups"
    __table_args__ = (
        CheckConstraint(between("status", GROUP_STATUS_NAME), name="status_range"),
        CheckConstraint(between("policy", GROUP_POLICY_NAME), name="policy_range"),
        CheckConstraint(
            "total >= 1 AND done >= 0 AND done <= total AND succeeded + failed + canceled = done"
            " AND running >= 0 AND queued >= 0 AND running + queued + done = total",
            name="counts_consistent",
        ),
        CheckConstraint(
            "(status IN (2, 3, 4, 5)) = (finished_at IS NOT NULL)", name="finished_iff_terminal"
        ),
        UniqueConstraint("tenant_id", "request_id", name="uq_task_groups_tenant_id_request_id"),
        Index(
            "ix_task_groups_tenant_created", "tenant_id", text("created_at DESC"), text("id DESC")
        ),
        Index(
            "ix_task_groups_work",
            "id",
            postgresql_where=text(
                "(cancel_pending AND status = 1)"
                " OR (status = 2 AND follow_up IS NOT NULL AND follow_up_task_id IS NULL)"
            ),
        ),
        {
            "comment": "Task groups. Every child change applies its difference to the counters in "
            "its transaction, under this row's lock (a group's last change recounts the children "
            "first), so they are exact. "
            "cancel_pending marks children still to cancel (group cancel, fail-fast) and a "
            "succeeded group with follow_up and no follow_up_task_id still owes its fan-in task: "
            "the group worker finishes both (ix_task_groups_work), so a crash between the two "
            "steps loses nothing. (tenant_id, request_id) makes CreateGroup idempotent."
        },
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary, comment="sha256 of the GroupSpec.")
    status: Mapped[int] = mapped_column(SmallInteger, comment="GroupStatus number.")
    policy: Mapped[int] = mapped_column(SmallInteger, comment="GroupPolicy number.")
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    succeeded: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    failed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    canceled: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    running: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    queued: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    progress_sum: Mapped[int] = mapped_column(
        BigInteger,
        server_default=text("0"),
        comment="Sum of the children's progress (a terminal child counts 100).",
    )
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    cancel_pending: Mapped[bool] = mapped_column(
        Boolean, server_default=text("false"), comment="Children still to cancel."
    )
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    follow_up: Mapped[bytes | None] = mapped_column(
        LargeBinary, comment="Serialized GroupFollowUp, when one is configured."
    )
    follow_up_task_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    labels: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    last_sequence: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class GroupEventRow(Base):
    """One event of a group's append-only history."""

    __tablename__ = "group_events"
    __table_args__ = (
        CheckConstraint("sequence >= 1", name="sequence_positive"),
        CheckConstraint("type BETWEEN 1 AND 5", name="type_range"),
        CheckConstraint(
            "payload IS NOT NULL OR (type = 2 AND snap_status IS NOT NULL)",
            name="payload_or_snapshot",
        ),
        {
            "comment": "A group's history, sequence 1, 2, 3... per group without gaps (bumped on "
            "the group row under its lock in the same transaction): every child event, the "
            "group's progress after it, its completion with every child's outputs. WatchGroup "
            "resumes from it."
        },
    )

    group_id: Mapped[uuid.UUID] = mapped_column(
        Uuid,
        primary_key=True,
        comment="No foreign key (a check per child event costs more than the rest of its write): "
        "events are appended only under the group's row lock, and a purge deletes both.",
    )
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(
        Uuid,
        comment="UUIDv7, or v4 for a CHILD event (no unique index: one index write less per child "
        "event).",
    )
    type: Mapped[int] = mapped_column(SmallInteger)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    payload: Mapped[bytes | None] = mapped_column(
        LargeBinary,
        comment="Serialized GroupEvent (without child_event: see child_task_id); NULL for a CHILD "
        "event stored as columns (snap_*).",
    )
    child_task_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid,
        comment="A CHILD event's child: its event is task_events (child_task_id, child_sequence), "
        "read with the group's history, never copied.",
    )
    child_sequence: Mapped[int | None] = mapped_column(BigInteger)
    snap_status: Mapped[int | None] = mapped_column(
        SmallInteger,
        comment="A CHILD event without payload: the group's status after the child's event.",
    )
    snap_done: Mapped[int | None] = mapped_column(Integer)
    snap_succeeded: Mapped[int | None] = mapped_column(Integer)
    snap_failed: Mapped[int | None] = mapped_column(Integer)
    snap_canceled: Mapped[int | None] = mapped_column(Integer)
    snap_running: Mapped[int | None] = mapped_column(Integer)
    snap_queued: Mapped[int | None] = mapped_column(Integer)
    snap_progress_sum: Mapped[int | None] = mapped_column(BigInteger)
    snap_cancel_requested: Mapped[bool | None] = mapped_column(Boolean)
