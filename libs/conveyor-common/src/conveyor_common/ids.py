"""Time-ordered identifiers (UUID version 7, RFC 9562).

Task and event ids are primary keys and unique keys of insert-heavy tables. Random (version 4) keys
land on random B-tree pages: every insert dirties a different page, and after each checkpoint each of
those pages costs a full-page image in the WAL. Version 7 ids start with the Unix time in
milliseconds, so new keys go to the right-most pages of their indexes, while the 74 random bits keep
them unguessable and unique across replicas without coordination.
"""

from __future__ import annotations

import os
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT = 0b10 << 62
_RAND_A = (1 << 12) - 1
_RAND_B = (1 << 62) - 1


def uuid7() -> uuid.UUID:
    """A new version-7 UUID: 48-bit Unix milliseconds, version, 74 random bits, variant."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | _VERSION_7
        | ((rand >> 64) & _RAND_A) << 64
        | _VARIANT
        | (rand & _RAND_B)
    )
    return uuid.UUID(int=value)
