"""Operator and provider controls on the scheduler's metadata: paused models and the provider's 429
throttle (tenants' pauses are columns of ``tenants``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from conveyor_scheduler.store.models import Base, _now


class ModelControl(Base):
    """Operator pause of a model or deployment."""

    __tablename__ = "model_controls"
    __table_args__ = (
        {"comment": "Paused models are skipped by the dispatcher; their queued tasks wait."},
    )

    model: Mapped[str] = mapped_column(Text, primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class ProviderControl(Base):
    """A provider's throttle (429 with retry_after reported by the adapter)."""

    __tablename__ = "provider_controls"
    __table_args__ = (
        {
            "comment": "No dispatch to a provider before throttled_until. Tasks already "
            "dispatched keep their slots."
        },
    )

    provider: Mapped[str] = mapped_column(Text, primary_key=True)
    throttled_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
