"""Rule tables of the operator API (tenants, paused models, dead letters, redrive, bulk cancel) and of
the client webhook API (endpoints, secrets, deliveries).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from conveyor.tasks.v1 import (
    task_pb2,
)
from conveyor_gateway.validation.checks import (
    MAX_BULK_TASK_IDS,
    MAX_FILTER_VALUES,
    MAX_WEBHOOK_EVENTS,
    OPAQUE_ID_RE,
    UUID_RE,
    Ctx,
    Table,
    enum_value,
    float_range,
    group_event_types,
    int_range,
    nested,
    optional_string,
    page_size,
    page_token,
    reason,
    ref,
    repeated_enum,
    request_id,
    required_string,
    target_ref_problem,
    task_id,
    tenant_id,
    timestamp,
    validate,
)
from conveyor_gateway.validation.tasks import webhook_url

TENANT_LIMITS: Table = {
    "max_concurrency": [int_range(0, 1_000_000)],
    "max_waiting": [int_range(0, 100_000_000)],
    "submit_rate_per_second": [float_range(0, 1_000_000)],
    "submit_burst": [int_range(0, 10_000_000)],
    "weight": [int_range(0, 1000)],
}


GET_TENANT: Table = {"tenant_id": [tenant_id(required=True)]}


UPSERT_TENANT: Table = {
    "request_id": [request_id(required=False)],
    "tenant_id": [tenant_id(required=True)],
    "tier": [enum_value(task_pb2.Tier)],
    "limits": [nested(TENANT_LIMITS)],
}


PAUSE_MODEL: Table = {
    "request_id": [request_id(required=False)],
    "model": [ref(target_ref_problem, required=True)],
    "reason": [reason],
}


RESUME_MODEL: Table = {
    "request_id": [request_id(required=False)],
    "model": [ref(target_ref_problem, required=True)],
}


PAUSE_TENANT: Table = {
    "request_id": [request_id(required=False)],
    "tenant_id": [tenant_id(required=True)],
    "reason": [reason],
}


RESUME_TENANT: Table = {
    "request_id": [request_id(required=False)],
    "tenant_id": [tenant_id(required=True)],
}


LIST_PAUSED: Table = {}


LIST_DEAD_LETTERS: Table = {
    "tenant_id": [tenant_id(required=False)],
    "page_size": [page_size],
    "page_token": [page_token],
}


def selector_task_ids(msg: Message, path: str, ctx: Ctx) -> None:
    """Explicit task ids: UUIDs, bounded count."""
    sel: Any = msg
    ids = sel.task_ids
    if len(ids) > MAX_BULK_TASK_IDS:
        ctx.bad(path, f"at most {MAX_BULK_TASK_IDS} task ids")
        return
    for i, value in enumerate(ids):
        if not UUID_RE.match(value):
            ctx.bad(f"{path}[{i}]", "must be a UUID")


def selector_not_empty(msg: Message, path: str, ctx: Ctx) -> None:
    """A bulk selector must select something (never 'every task')."""
    sel: Any = msg
    if not (
        sel.task_ids or sel.tenant_id or sel.model or sel.statuses or sel.HasField("created_before")
    ):
        ctx.bad(path, "select by task_ids, tenant_id, model, statuses or created_before")


BULK_SELECTOR: Table = {
    "task_ids": [selector_task_ids],
    "tenant_id": [tenant_id(required=False)],
    "model": [ref(target_ref_problem, required=False)],
    "statuses": [repeated_enum(task_pb2.TaskStatus, MAX_FILTER_VALUES)],
    "created_before": [timestamp()],
    "limit": [int_range(0, 10_000)],
}


REDRIVE: Table = {
    "request_id": [request_id(required=False)],
    "selector": [nested(BULK_SELECTOR, required=True)],
}


def _bulk_cancel_selector(msg: Message, path: str, ctx: Ctx) -> None:
    req: Any = msg
    if not req.HasField("selector"):
        ctx.bad(path, "is required")
        return
    validate(req.selector, BULK_SELECTOR, ctx, path)
    selector_not_empty(req.selector, path, ctx)


BULK_CANCEL: Table = {
    "request_id": [request_id(required=False)],
    "selector": [_bulk_cancel_selector],
    "reason": [reason],
}


CREATE_ENDPOINT: Table = {
    "request_id": [request_id(required=False)],
    "url": [webhook_url(required=True)],
    "events": [repeated_enum(task_pb2.TaskEventType, MAX_WEBHOOK_EVENTS)],
    "group_events": [group_event_types],
}


LIST_ENDPOINTS: Table = {}


DELETE_ENDPOINT: Table = {
    "request_id": [request_id(required=False)],
    "endpoint_id": [required_string(128, OPAQUE_ID_RE, "an endpoint id")],
}


ROTATE_SECRET: Table = {
    "request_id": [request_id(required=False)],
    "overlap_seconds": [int_range(0, 30 * 24 * 3600)],
}


LIST_DELIVERIES: Table = {
    "task_id": [task_id(required=False)],
    "endpoint_id": [optional_string(128, OPAQUE_ID_RE, "an endpoint id")],
    "page_size": [page_size],
    "page_token": [page_token],
}
