"""The services' own random generator, for jitter and shard picks.

It never touches the ``random`` module's global state, which callers' code may seed or check: the
fuzz tests run the gateway and the scheduler in their own process, and Hypothesis fails a test whose
strategies see the global state move while it draws (a submit's queue-shard pick on the event loop's
thread did that now and then).
"""

from __future__ import annotations

import random

rng = random.Random()
"""Seeded from the OS at import; not for secrets (use ``secrets``)."""
