"""Request-scoped context carried through logs, gRPC calls and Kafka records (contextvars)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

_random = random.Random()
"""Ids of traces and spans (seeded from the OS at import, and again in a forked child)."""
os.register_at_fork(after_in_child=_random.seed)

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
task_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)
tenant_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tenant_id", default=None
)
traceparent_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "traceparent", default=None
)


def new_traceparent(parent: str | None = None) -> str:
    """A W3C ``traceparent``: keeps the trace id of ``parent`` (if valid) with a new span id.

    Ids come from ``random.getrandbits`` as OpenTelemetry's own id generator does: unique, not
    secret. ``secrets`` read the kernel's entropy with two system calls per id, on every RPC and
    every record published outside a request (a few percent of the adapter's CPU, profiled)."""
    trace_id = ""
    if parent:
        parts = parent.split("-")
        if len(parts) == 4 and len(parts[1]) == 32:
            trace_id = parts[1]
    if not trace_id:
        trace_id = f"{_random.getrandbits(128) or 1:032x}"  # all zeros is invalid
    return f"00-{trace_id}-{_random.getrandbits(64) or 1:016x}-01"


def current_traceparent() -> str:
    """The traceparent of the current context, or a new root one."""
    return traceparent_var.get() or new_traceparent()


@contextmanager
def bound(
    *,
    request_id: str | None = None,
    task_id: str | None = None,
    tenant_id: str | None = None,
    traceparent: str | None = None,
) -> Iterator[None]:
    """Bind ids for the duration of a block (only those given)."""
    tokens: list[tuple[contextvars.ContextVar[str | None], contextvars.Token[str | None]]] = []
    for var, value in (
        (request_id_var, request_id),
        (task_id_var, task_id),
        (tenant_id_var, tenant_id),
        (traceparent_var, traceparent),
    ):
        if value is not None:
            tokens.append((var, var.set(value)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            # A cancelled server stream's generator is finalized in another context: nothing to reset.
            with contextlib.suppress(ValueError):
                var.reset(token)
