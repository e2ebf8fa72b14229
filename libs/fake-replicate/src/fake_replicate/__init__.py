"""A faithful local fake of Replicate's HTTP API for tests, ``make run`` and benchmarks.

See ``libs/fake-replicate/README.md`` for routes, input knobs (``__fake_*``), fault knobs and the ledger.
"""

from fake_replicate.config import FakeConfig
from fake_replicate.ledger import (
    Concurrency,
    Ledger,
    max_concurrency,
    predictions_per_attempt,
    predictions_per_task,
    summary,
)
from fake_replicate.server import FakeReplicate, build_app

__all__ = [
    "Concurrency",
    "FakeConfig",
    "FakeReplicate",
    "Ledger",
    "build_app",
    "max_concurrency",
    "predictions_per_attempt",
    "predictions_per_task",
    "summary",
]
