"""Deliveries are decided where the event is written (ADR 0007): a task's own webhook endpoint
(TaskSpec.webhook) is written with the task at submit, no longer on its first delivery. Tasks still
in flight get theirs now, so their next events are delivered.

Revision ID: 0009_task_endpoints_at_submit
Revises: 0008_group_child_event_columns
Create Date: 2026-12-05 10:20:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009_task_endpoints_at_submit"
down_revision: str | None = "0008_group_child_event_columns"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "INSERT INTO webhook_endpoints (id, tenant_id, task_id, url, event_types)"
        " SELECT gen_random_uuid(), t.tenant_id, t.id::text, t.webhook_url,"
        " COALESCE(t.webhook_events, '{}'::smallint[])"
        " FROM tasks t WHERE t.webhook_url IS NOT NULL AND t.status IN (1, 2, 3)"
        " ON CONFLICT DO NOTHING"
    )


def downgrade() -> None:
    """Nothing to undo: the endpoints are the ones the old path would have made."""
