"""Client webhooks of group events: endpoints subscribe to group event types, a group may have its
own endpoint (GroupSpec.webhook), and a delivery may carry a group event.

Revision ID: 0007_group_webhooks
Revises: 0006_tenant_pause
Create Date: 2026-12-05 09:30:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007_group_webhooks"
down_revision: str | None = "0006_tenant_pause"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "webhook_endpoints",
        sa.Column(
            "group_event_types",
            postgresql.ARRAY(sa.SmallInteger()),
            server_default=sa.text("'{}'::smallint[]"),
            nullable=False,
            comment="GroupEventType numbers delivered; empty = GROUP_EVENT_TYPE_COMPLETED only.",
        ),
    )
    op.add_column(
        "webhook_endpoints",
        sa.Column(
            "group_id",
            sa.Uuid(),
            nullable=True,
            comment="Set for a group's own endpoint (GroupSpec.webhook): that group's events only.",
        ),
    )
    op.create_index(
        "uq_webhook_endpoints_group",
        "webhook_endpoints",
        ["tenant_id", "group_id"],
        unique=True,
        postgresql_where=sa.text("group_id IS NOT NULL"),
    )
    op.add_column(
        "webhook_deliveries",
        sa.Column(
            "group_id",
            sa.Uuid(),
            nullable=True,
            comment="Set for a delivery of a group event: event is a GroupEvent, event_type a "
            "GroupEventType number and task_id the group id (per-group order).",
        ),
    )
    op.alter_column(
        "webhook_deliveries",
        "event",
        existing_type=sa.LargeBinary(),
        comment="Serialized TaskEvent (GroupEvent when group_id is set).",
        existing_comment="Serialized TaskEvent.",
    )


def downgrade() -> None:
    op.alter_column(
        "webhook_deliveries",
        "event",
        existing_type=sa.LargeBinary(),
        comment="Serialized TaskEvent.",
        existing_comment="Serialized TaskEvent (GroupEvent when group_id is set).",
    )
    op.drop_column("webhook_deliveries", "group_id")
    op.drop_index("uq_webhook_endpoints_group", table_name="webhook_endpoints")
    op.drop_column("webhook_endpoints", "group_id")
    op.drop_column("webhook_endpoints", "group_event_types")
