"""conveyor_provider_adapter.matching: input normalisation and list matching by model, input and window."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from conveyor_provider_adapter.matching import matches, normalize_input
from conveyor_provider_adapter.replicate import (
    Prediction,
)
from conveyor_provider_adapter.state import AttemptInfo

# ---- matching --------------------------------------------------------------------------------


def test_integral_floats_from_a_struct_become_ints() -> None:
    assert normalize_input({"steps": 30.0, "cfg": 7.5, "seeds": [1.0, 2.5], "n": {"x": 2.0}}) == {
        "steps": 30,
        "cfg": 7.5,
        "seeds": [1, 2.5],
        "n": {"x": 2},
    }
    assert isinstance(normalize_input(30.0), int)


def test_list_matching_needs_same_model_input_and_window() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    info = AttemptInfo(task_id="t", attempt=1, model="acme/flux", input={"prompt": "a", "n": 2})

    def pred(**kw: Any) -> Prediction:
        base: dict[str, Any] = {
            "id": "p",
            "status": "starting",
            "model": "acme/flux",
            "version": "hidden",
            "input": {"prompt": "a", "n": 2.0},
            "created_at": "2026-01-01T00:00:05Z",
        }
        base.update(kw)
        return Prediction.from_json(base)

    assert matches(pred(), info, since)
    assert not matches(pred(model="acme/other"), info, since)
    assert not matches(pred(input={"prompt": "b", "n": 2}), info, since)
    assert not matches(pred(created_at="2025-12-31T23:59:59Z"), info, since)
    assert not matches(pred(), AttemptInfo(task_id="t", attempt=1, model="acme/flux"), since)
