"""The one exception the devstack raises."""

from __future__ import annotations


class DevstackError(RuntimeError):
    """A backend could not be found, started or reached; the message says what is missing."""
