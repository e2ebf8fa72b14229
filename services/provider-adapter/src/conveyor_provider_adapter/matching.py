"""Finding the prediction of an ambiguous create through ``GET /v1/predictions?created_after=``.

Replicate's prediction objects carry no webhook URL (so no task id) and the create has no
idempotency key, so a prediction is matched on what we sent: the same model (or deployment), the
same version when we pinned one, an identical ``input`` document, and ``created_at`` after the
attempt's ``submit_started_at`` (minus a clock-skew margin). Exactly one candidate must match;
two tasks with byte-identical inputs created in the same window are ambiguous and nothing is
adopted (the start webhook, whose URL does carry task and attempt, settles those). A replica that
restarted no longer has the input of an older ambiguous create and cannot match it here; the
webhook or, after the grace period, a retryable failure (new attempt) covers that case.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import Any

from conveyor_provider_adapter.replicate import Prediction, ReplicateClient, parse_target
from conveyor_provider_adapter.state import AttemptInfo

logger = logging.getLogger(__name__)


def normalize_input(value: Any) -> Any:
    """JSON from a protobuf Struct with integral floats turned back into ints (30.0 -> 30)."""
    if (
        isinstance(value, float)
        and math.isfinite(value)
        and value.is_integer()
        and abs(value) < 2**53
    ):
        return int(value)
    if isinstance(value, dict):
        return {str(k): normalize_input(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize_input(v) for v in value]
    return value


def matches(prediction: Prediction, info: AttemptInfo, created_after: datetime) -> bool:
    """Whether ``prediction`` is plausibly the one created for ``info``'s dispatch."""
    if info.input is None:
        return False
    if prediction.created_at is not None and prediction.created_at < created_after:
        return False
    try:
        target = parse_target(info.model or None, info.deployment or None)
    except ValueError:
        return False
    if target.form == "deployment":
        if prediction.deployment and prediction.deployment != target.model:
            return False
    elif target.owner and prediction.model and prediction.model != target.model:
        return False
    if (
        target.form == "version"
        and target.version
        and prediction.version not in ("", "hidden", target.version)
    ):
        return False
    return bool(normalize_input(prediction.input) == info.input)


async def find_match(
    client: ReplicateClient, info: AttemptInfo, *, created_after: datetime
) -> Prediction | None:
    """The single prediction matching the attempt's dispatch, or None (none, or ambiguous)."""
    if info.input is None:
        return None
    found: list[Prediction] = []
    async for prediction in client.list_predictions(created_after=created_after):
        if matches(prediction, info, created_after):
            found.append(prediction)
            if len(found) > 1:
                break
    if len(found) == 1:
        return found[0]
    if found:
        logger.warning(
            "several predictions match the attempt's input; adopting none",
            extra={
                "action": "reconcile_ambiguous",
                "task_id": info.task_id,
                "attempt": info.attempt,
            },
        )
    return None
