"""Declarative request validation: one rule table per message, plus semantic checks.

A rule table maps a field name to the checks of that field; nested messages refer to their own table,
so every violation names its full path (``spec.input``, ``items[3].spec.model``,
``spec.labels["env"]``). :meth:`Validator.check` collects *every* violation of a request (nothing stops
at the first) and raises :class:`~conveyor_common.errors.InvalidArgument` with a BadRequest listing them
all; a request with violations is never forwarded.

Semantic checks: model and deployment reference formats, the serialized size of ``spec.input``,
priorities and deadlines in range, label limits, batch size, and URLs. Any string in ``spec.input`` that
looks like a URL, and every webhook URL, goes through the shared SSRF policy of
:mod:`conveyor_common.ssrf` (the scheduler and the notifier apply the same one): https only, no
userinfo or ambiguous IP spellings, and every address the host resolves to must be public (loopback,
private, link-local/cloud metadata, CGNAT, multicast, reserved, mapped... are refused). Resolution runs
after the syntax checks, concurrently, in the resolver's thread pool, with a time limit.
``url_allowed_hosts`` (host names, addresses or CIDRs) exempts hosts in tests and local runs.

Modules: :mod:`.checks` (the check builders, limits and the validation context), :mod:`.tasks` (task
spec and task RPC tables), :mod:`.admin` (admin and webhook RPC tables); here the table of every
public request and the :class:`Validator`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from google.protobuf.message import Message

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import webhook_service_pb2 as hook_pb2
from conveyor_common.errors import FieldViolation, InvalidArgument, Unavailable
from conveyor_common.ssrf import RefusalReason, Target, UrlPolicy, UrlRefused
from conveyor_common.textcheck import JsonBounds, merge_violations, text_violations
from conveyor_gateway.validation.admin import (
    BULK_CANCEL,
    CREATE_ENDPOINT,
    DELETE_ENDPOINT,
    GET_TENANT,
    LIST_DEAD_LETTERS,
    LIST_DELIVERIES,
    LIST_ENDPOINTS,
    LIST_PAUSED,
    PAUSE_MODEL,
    PAUSE_TENANT,
    REDRIVE,
    RESUME_MODEL,
    RESUME_TENANT,
    ROTATE_SECRET,
    UPSERT_TENANT,
)
from conveyor_gateway.validation.checks import (
    DNS_RETRY_SECONDS,
    Ctx,
    Limits,
    Table,
    model_ref_problem,
    validate,
)
from conveyor_gateway.validation.tasks import (
    BATCH_SUBMIT,
    CANCEL_TASK,
    GET_TASK,
    LIST_TASKS,
    QUEUE_STATS,
    SUBMIT,
    WATCH_TASK,
    WATCH_TASKS,
)

TABLES: dict[type[Message], Table] = {
    svc_pb2.SubmitTaskRequest: SUBMIT,
    svc_pb2.BatchSubmitTasksRequest: BATCH_SUBMIT,
    svc_pb2.GetTaskRequest: GET_TASK,
    svc_pb2.ListTasksRequest: LIST_TASKS,
    svc_pb2.CancelTaskRequest: CANCEL_TASK,
    svc_pb2.WatchTaskRequest: WATCH_TASK,
    svc_pb2.WatchTasksRequest: WATCH_TASKS,
    svc_pb2.GetQueueStatsRequest: QUEUE_STATS,
    admin_pb2.GetTenantRequest: GET_TENANT,
    admin_pb2.UpsertTenantRequest: UPSERT_TENANT,
    admin_pb2.PauseModelRequest: PAUSE_MODEL,
    admin_pb2.ResumeModelRequest: RESUME_MODEL,
    admin_pb2.PauseTenantRequest: PAUSE_TENANT,
    admin_pb2.ResumeTenantRequest: RESUME_TENANT,
    admin_pb2.ListPausedRequest: LIST_PAUSED,
    admin_pb2.ListDeadLettersRequest: LIST_DEAD_LETTERS,
    admin_pb2.RedriveTasksRequest: REDRIVE,
    admin_pb2.BulkCancelTasksRequest: BULK_CANCEL,
    hook_pb2.CreateWebhookEndpointRequest: CREATE_ENDPOINT,
    hook_pb2.ListWebhookEndpointsRequest: LIST_ENDPOINTS,
    hook_pb2.DeleteWebhookEndpointRequest: DELETE_ENDPOINT,
    hook_pb2.RotateWebhookSecretRequest: ROTATE_SECRET,
    hook_pb2.ListWebhookDeliveriesRequest: LIST_DELIVERIES,
}


class Validator:
    """Validates public requests by their rule table; resolves URL hosts."""

    def __init__(
        self,
        limits: Limits | None = None,
        url_policy: UrlPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits or Limits()
        self.url_policy = url_policy or UrlPolicy()
        self._clock = clock

    def violations(self, request: Message) -> tuple[list[FieldViolation], list[tuple[str, Target]]]:
        """Synchronous checks: the violations and the (path, URL) pairs still to resolve."""
        table = TABLES[type(request)]
        ctx = Ctx(self.limits, self._clock(), url_policy=self.url_policy)
        validate(request, table, ctx)
        bounds = JsonBounds(self.limits.max_input_depth, self.limits.max_input_nodes)
        return merge_violations(text_violations(request, bounds), ctx.violations, ctx.urls)

    async def check(self, request: Message) -> None:
        """Raise InvalidArgument naming every bad field of ``request`` (UNAVAILABLE with RetryInfo
        when a URL's host could not be resolved for now: DNS down or slow, retry later)."""
        violations, urls = self.violations(request)
        if urls:
            outcomes = await asyncio.gather(
                *(self.url_policy.check(t.url) for _, t in urls), return_exceptions=True
            )
            unavailable: list[str] = []
            for (path, _), outcome in zip(urls, outcomes, strict=True):
                if isinstance(outcome, UrlRefused):
                    if outcome.reason is RefusalReason.RESOLVER_UNAVAILABLE:
                        unavailable.append(f"{path}: {outcome.message}")
                    else:
                        violations.append(FieldViolation(field=path, description=outcome.message))
                elif isinstance(outcome, BaseException):
                    raise outcome
            if unavailable and not violations:
                raise Unavailable("; ".join(unavailable), retry_after_seconds=DNS_RETRY_SECONDS)
        if violations:
            raise InvalidArgument(violations)


__all__ = ["TABLES", "Limits", "Validator", "model_ref_problem"]
