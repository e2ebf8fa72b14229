"""What the clients are built from: request ids, task specs from plain values, the token source (a
static token or a provider refreshed before expiry), channel options and TLS from the environment,
and the retry and watch constants."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import grpc
from google.protobuf import struct_pb2

from conveyor.tasks.v1 import task_pb2

TERMINAL_EVENTS = frozenset(
    {
        task_pb2.TASK_EVENT_TYPE_SUCCEEDED,
        task_pb2.TASK_EVENT_TYPE_FAILED,
        task_pb2.TASK_EVENT_TYPE_CANCELED,
        task_pb2.TASK_EVENT_TYPE_DEAD_LETTERED,
        task_pb2.TASK_EVENT_TYPE_EXPIRED,
    }
)


TERMINAL_STATUSES = frozenset(
    {
        task_pb2.TASK_STATUS_SUCCEEDED,
        task_pb2.TASK_STATUS_FAILED,
        task_pb2.TASK_STATUS_CANCELED,
        task_pb2.TASK_STATUS_DEAD_LETTERED,
        task_pb2.TASK_STATUS_EXPIRED,
    }
)


RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


MAX_BATCH_ITEMS = 100
"""The gateway's default item limit of one BatchSubmitTasks call (GATEWAY_MAX_BATCH_ITEMS)."""


TOKEN_REFRESH_MARGIN_SECONDS = 60.0
"""A provided token is asked for again this long before its ``exp``."""


TokenProvider = Callable[[], str]
"""A callable returning a bearer token; called again shortly before the previous one expires."""


WATCH_RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        # A watcher that fell too far behind is told to resume; an edge rate limit clears too.
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
"""Codes on which a watch stream resumes from its last sequence number."""


def new_request_id() -> str:
    """A fresh idempotency key."""
    return str(uuid.uuid4())


def build_spec(
    kind: task_pb2.TaskKind.ValueType | str,
    *,
    model: str | None = None,
    deployment: str | None = None,
    input: dict[str, Any] | None = None,
    priority: task_pb2.Priority.ValueType | str = task_pb2.PRIORITY_UNSPECIFIED,
    queue_deadline: datetime | None = None,
    run_timeout: timedelta | float | None = None,
    max_attempts: int = 0,
    labels: dict[str, str] | None = None,
    webhook_url: str | None = None,
    webhook_events: Iterable[task_pb2.TaskEventType.ValueType] = (),
) -> task_pb2.TaskSpec:
    """A TaskSpec from plain Python values (kind/priority by enum or name: ``"video"``, ``"high"``)."""
    spec = task_pb2.TaskSpec(
        kind=_enum(task_pb2.TaskKind, "TASK_KIND_", kind),
        priority=_enum(task_pb2.Priority, "PRIORITY_", priority),
        max_attempts=max_attempts,
    )
    if model is not None:
        spec.model = model
    if deployment is not None:
        spec.deployment = deployment
    if input is not None:
        doc = struct_pb2.Struct()
        doc.update(input)
        spec.input.CopyFrom(doc)
    if queue_deadline is not None:
        spec.queue_deadline.FromDatetime(queue_deadline)
    if run_timeout is not None:
        seconds = run_timeout.total_seconds() if isinstance(run_timeout, timedelta) else run_timeout
        spec.run_timeout.FromTimedelta(timedelta(seconds=seconds))
    if labels:
        spec.labels.update(labels)
    if webhook_url is not None:
        spec.webhook.url = webhook_url
        spec.webhook.events.extend(webhook_events)
    return spec


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (unverified), or None when it has none or is not a JWT."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
    except (IndexError, ValueError):
        return None
    return float(exp) if isinstance(exp, int | float) else None


class _TokenSource:
    """A static token or a provider whose token is cached until shortly before its expiry."""

    def __init__(self, token: str | TokenProvider | None, margin: float) -> None:
        self.provider: TokenProvider | None = (
            None if token is None or isinstance(token, str) else token
        )
        self.value: str | None = token if isinstance(token, str) else None
        self.expires_at: float | None = None
        self.margin = margin

    def get(self) -> str | None:
        if self.provider is not None and (
            self.value is None
            or self.expires_at is None
            or time.time() >= self.expires_at - self.margin
        ):
            self.value = self.provider()
            self.expires_at = token_expiry(self.value)
        return self.value

    def invalidate(self) -> bool:
        """Forget a provided token (after UNAUTHENTICATED); False for a static one."""
        if self.provider is None:
            return False
        self.value = None
        return True


def channel_options_from_env(
    environ: Any = None,
) -> tuple[str, str | None, grpc.ChannelCredentials | None]:
    """Address, token and TLS credentials from ``CONVEYOR_*`` variables.

    ``CONVEYOR_ADDRESS`` (default 127.0.0.1:50051), ``CONVEYOR_TOKEN``, ``CONVEYOR_TLS`` (1/true),
    ``CONVEYOR_CA_FILE``, ``CONVEYOR_CERT_FILE`` and ``CONVEYOR_KEY_FILE`` (mutual TLS); any of the
    files implies TLS.
    """
    env = os.environ if environ is None else environ
    address = env.get("CONVEYOR_ADDRESS") or "127.0.0.1:50051"
    token = env.get("CONVEYOR_TOKEN") or None
    ca, cert, key = (env.get(f"CONVEYOR_{n}_FILE") or None for n in ("CA", "CERT", "KEY"))
    tls = (env.get("CONVEYOR_TLS") or "").lower() in ("1", "true", "yes", "on")
    return address, token, tls_credentials(tls=tls, ca_file=ca, cert_file=cert, key_file=key)


def tls_credentials(
    *, tls: bool, ca_file: str | None, cert_file: str | None, key_file: str | None
) -> grpc.ChannelCredentials | None:
    """Channel credentials (None = plaintext) from PEM file paths."""
    if not (tls or ca_file or cert_file):
        return None

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file),
        private_key=read(key_file),
        certificate_chain=read(cert_file),
    )


def _chunk_request_id(request_id: str, index: int) -> str:
    """The batch request id of chunk ``index`` (the first keeps the caller's id); deterministic."""
    if index == 0:
        return request_id
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"conveyor-batch:{request_id}/{index}"))


def _enum(enum: Any, prefix: str, value: int | str) -> Any:
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith(prefix):
            name = prefix + name
        return enum.Value(name)
    return value
