"""The size limits the gateway and the scheduler share: one source for both sides.

The gateway enforces its configured limits (``GATEWAY_MAX_INPUT_BYTES``, ``GATEWAY_MAX_LABELS``, ...),
each bounded by the ceiling here; the scheduler's defensive checks use the ceilings themselves, so
raising a gateway knob up to its ceiling never makes the scheduler answer INVALID_ARGUMENT to what
the gateway accepted. Policy limits the scheduler owns (``SCHEDULER_MAX_ATTEMPTS_CAP``) are enforced
by the scheduler only; the gateway checks their ceiling.
"""

from __future__ import annotations

MiB = 1024 * 1024

ID_MAX_LENGTH = 128
"""Request ids, task ids, group ids and other opaque ids."""
REF_MAX_LENGTH = 256
"""A model or deployment reference (``owner/name[:version]``)."""
INPUT_BYTES_CEILING = 16 * MiB
"""Largest serialized ``spec.input`` any setting may allow."""
MESSAGE_BYTES_CEILING = 64 * MiB
"""Largest request message the gateway may accept; internal servers accept this much."""
LABELS_CEILING = 1000
"""Most labels per task any setting may allow."""
LABEL_KEY_LENGTH_CEILING = 1024
LABEL_VALUE_LENGTH_CEILING = 4096
BATCH_ITEMS_CEILING = 10_000
"""Most items of one batch submit (and of one internal coalesced group)."""
GROUP_CHILDREN_CEILING = 10_000
"""Most children of one task group."""
BULK_CEILING = 10_000
"""Most tasks one admin bulk operation touches."""
MAX_ATTEMPTS_CEILING = 100
"""Largest ``max_attempts`` any ``SCHEDULER_MAX_ATTEMPTS_CAP`` may allow."""
