"""The scheduler's clock (one place, so every module agrees on UTC and tests can reason about it)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The scheduler clock."""
    return datetime.now(UTC)
