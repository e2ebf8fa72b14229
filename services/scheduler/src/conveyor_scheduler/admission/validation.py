"""Defensive validation of submits at the scheduler (the gateway validates in full).

The bounds are the shared ceilings of ``conveyor_common.limits``, never stricter than what the
gateway may be configured to accept; the attempts cap is the scheduler's own policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from conveyor.tasks.v1 import admin_service_pb2, task_pb2
from conveyor_common import limits
from conveyor_common.errors import (
    FieldViolation,
    InvalidArgument,
)
from conveyor_common.vocabulary import KIND_NAME, PRIORITY_NAME
from conveyor_scheduler.client_webhooks.rpcs import check_callback_url
from conveyor_scheduler.client_webhooks.settings import WebhookPolicy

MAX_ID_LEN = limits.ID_MAX_LENGTH
MAX_BULK = limits.BULK_CEILING
MAX_GROUP = limits.BATCH_ITEMS_CEILING


def validate_item(
    prefix: str, request_id: str, spec: task_pb2.TaskSpec, max_attempts_cap: int
) -> list[FieldViolation]:
    """Defensive checks of one submit item (the gateway does the full validation)."""
    v: list[FieldViolation] = []
    if not request_id or len(request_id) > MAX_ID_LEN:
        v.append(FieldViolation(f"{prefix}request_id", f"required, 1-{MAX_ID_LEN} characters"))
    if spec.kind not in KIND_NAME:
        v.append(FieldViolation(f"{prefix}spec.kind", "must be a known task kind"))
    target = spec.WhichOneof("target")
    ref = spec.model if target == "model" else spec.deployment if target == "deployment" else ""
    if not ref or len(ref) > limits.REF_MAX_LENGTH or "/" not in ref:
        v.append(
            FieldViolation(f"{prefix}spec.target", "model or deployment 'owner/name' required")
        )
    if spec.priority and spec.priority not in PRIORITY_NAME:
        v.append(FieldViolation(f"{prefix}spec.priority", "unknown priority"))
    if spec.max_attempts < 0 or spec.max_attempts > max_attempts_cap:
        v.append(FieldViolation(f"{prefix}spec.max_attempts", f"must be 0-{max_attempts_cap}"))
    if spec.HasField("run_timeout") and spec.run_timeout.ToTimedelta().total_seconds() < 1:
        v.append(FieldViolation(f"{prefix}spec.run_timeout", "must be at least 1 second"))
    if spec.input.ByteSize() > limits.INPUT_BYTES_CEILING:
        v.append(
            FieldViolation(f"{prefix}spec.input", f"larger than {limits.INPUT_BYTES_CEILING} bytes")
        )
    if len(spec.labels) > limits.LABELS_CEILING:
        v.append(FieldViolation(f"{prefix}spec.labels", f"at most {limits.LABELS_CEILING} labels"))
    return v


async def webhook_url_violations(
    items: Sequence[tuple[str, task_pb2.TaskSpec]], policy: WebhookPolicy
) -> list[FieldViolation]:
    """The shared SSRF policy over each item's ``spec.webhook.url`` (``(field prefix, spec)``).

    Same policy as registered endpoints (:func:`check_callback_url`: https unless allow-listed by
    ``SCHEDULER_WEBHOOK_ALLOW_HOSTS``, no private, loopback, link-local ... address after DNS,
    resolved in a thread). The URLs are checked concurrently, each distinct URL once; a refusal is
    one violation per item naming ``{prefix}spec.webhook.url``. UNAVAILABLE when DNS fails
    temporarily.
    """
    urls = {spec.webhook.url for _, spec in items if spec.HasField("webhook") and spec.webhook.url}
    if not urls:
        return []
    ordered = sorted(urls)
    outcomes = await asyncio.gather(
        *(check_callback_url(url, policy) for url in ordered), return_exceptions=True
    )
    refused: dict[str, str] = {}
    for url, outcome in zip(ordered, outcomes, strict=True):
        if isinstance(outcome, InvalidArgument):
            refused[url] = outcome.violations[0].description
        elif isinstance(outcome, BaseException):
            raise outcome
    return [
        FieldViolation(f"{prefix}spec.webhook.url", refused[spec.webhook.url])
        for prefix, spec in items
        if spec.HasField("webhook") and spec.webhook.url in refused
    ]


def _bulk_limit(selector: admin_service_pb2.BulkSelector) -> int:
    if selector.limit < 0 or selector.limit > MAX_BULK:
        raise InvalidArgument([FieldViolation("selector.limit", "must be 0-10000")])
    return selector.limit or 1000
