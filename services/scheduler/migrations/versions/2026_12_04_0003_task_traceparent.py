"""The trace context a task was submitted under (W3C traceparent), for one trace per task.

Revision ID: 0003_task_traceparent
Revises: 0002_webhooks
Create Date: 2026-12-04 23:50:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_task_traceparent"
down_revision: str | None = "0002_webhooks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "tasks",
        sa.Column(
            "traceparent",
            sa.Text(),
            nullable=True,
            comment="W3C traceparent of the submit: every record about the task carries its trace.",
        ),
    )


def downgrade() -> None:
    op.drop_column("tasks", "traceparent")
