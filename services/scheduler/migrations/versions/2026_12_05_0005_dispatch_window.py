"""Dispatched tasks no adapter has begun to create, counted by every dispatch cycle (the window).

Revision ID: 0005_dispatch_window
Revises: 0004_groups
Create Date: 2026-12-05 04:50:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_dispatch_window"
down_revision: str | None = "0004_groups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_tasks_awaiting_adapter",
        "tasks",
        ["dispatched_at"],
        postgresql_where=sa.text("status = 2 AND submit_state = 1"),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_awaiting_adapter", table_name="tasks")
