"""An operator's pause of a tenant (its tasks are accepted but none is dispatched).

Revision ID: 0006_tenant_pause
Revises: 0005_dispatch_window
Create Date: 2026-12-05 05:20:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_tenant_pause"
down_revision: str | None = "0005_dispatch_window"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "tenants",
        sa.Column(
            "paused",
            sa.Boolean(),
            server_default=sa.text("false"),
            nullable=False,
            comment="An operator paused the tenant: its tasks are accepted but none is dispatched.",
        ),
    )
    op.add_column("tenants", sa.Column("paused_reason", sa.Text(), nullable=True))
    op.add_column("tenants", sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_tenants_paused", "tenants", ["tenant_id"], postgresql_where=sa.text("paused")
    )


def downgrade() -> None:
    op.drop_index("ix_tenants_paused", table_name="tenants")
    op.drop_column("tenants", "paused_at")
    op.drop_column("tenants", "paused_reason")
    op.drop_column("tenants", "paused")
