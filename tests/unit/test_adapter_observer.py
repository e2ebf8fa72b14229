"""conveyor_provider_adapter.results.Observer: a requested cancel reaches the provider once."""

from __future__ import annotations

import asyncio
from typing import Any

from conveyor_provider_adapter.replicate import (
    Prediction,
)
from conveyor_provider_adapter.state import AttemptInfo


async def test_a_requested_cancel_reaches_the_provider_once() -> None:
    """The command handler, the observer and the reconciler may all notice a requested cancel at once:
    one cancel call per prediction; a failed call can be tried again."""
    from prometheus_client import CollectorRegistry

    from conveyor_provider_adapter.metrics import AdapterMetrics
    from conveyor_provider_adapter.replicate import Prediction, ReplicateError
    from conveyor_provider_adapter.results import Observer

    calls: list[str] = []
    fail = [True]

    class Provider:
        async def cancel(self, prediction_id: str) -> Prediction:
            calls.append(prediction_id)
            await asyncio.sleep(0.05)
            if fail[0]:
                fail[0] = False
                raise ReplicateError("boom", status=503)
            return Prediction(id=prediction_id, status="canceled")

    stub: Any = None
    observer = Observer(
        state=stub,
        coordinator=stub,
        replicate=Provider(),  # type: ignore[arg-type]
        copier=stub,
        publisher=stub,
        metrics=AdapterMetrics(CollectorRegistry()),
    )
    info = AttemptInfo(task_id="t", attempt=1)
    first = await asyncio.gather(*(observer.cancel_once(info, "p1") for _ in range(3)))
    assert calls == ["p1"]  # concurrent callers: one call
    assert first == [None, None, None]  # it failed: nothing recorded
    again = await asyncio.gather(*(observer.cancel_once(info, "p1") for _ in range(3)))
    assert calls == ["p1", "p1"]
    assert [p.status if p else None for p in again] == ["canceled", None, None]
    assert await observer.cancel_once(info, "p1") is None  # accepted before: not repeated
    assert calls == ["p1", "p1"]
