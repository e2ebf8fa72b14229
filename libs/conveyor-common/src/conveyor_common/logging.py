"""JSON logs on stdout carrying request, task and tenant ids from contextvars.

Modules use ``logging.getLogger(__name__)`` only; ``configure_logging`` is called once, in ``__main__``.
Log a stable ``action`` key with ``extra={"action": "..."}`` for machine-readable events.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from conveyor_common.context import request_id_var, task_id_var, tenant_id_var, traceparent_var
from conveyor_common.redact import RedactingFilter, limit_grpc_core_logs


class ContextFilter(logging.Filter):
    """Adds the ids bound in the current context to every record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        for name, var in (
            ("request_id", request_id_var),
            ("task_id", task_id_var),
            ("tenant_id", tenant_id_var),
            ("traceparent", traceparent_var),
        ):
            if not hasattr(record, name):
                value = var.get()
                if value is not None:
                    setattr(record, name, value)
        return True


def configure_logging(service: str, level: str = "INFO", *, stream: Any = None) -> None:
    """Route every logger (ours, grpc, aiokafka) to one JSON handler on stdout.

    Credentials never reach the output (:mod:`conveyor_common.redact`): every record is redacted,
    and gRPC's C core is kept at ERROR (call this before any gRPC channel or server is made).
    """
    overridden = limit_grpc_core_logs()
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            timestamp=False,
        )
    )
    handler.addFilter(ContextFilter(service))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Chatty libraries stay at WARNING unless we debug.
    if level.upper() != "DEBUG":
        for name in ("aiokafka", "kafka", "httpx", "httpcore", "sqlalchemy.engine", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if overridden:
        logging.getLogger(__name__).warning(
            "GRPC_VERBOSITY set to ERROR: gRPC's C-core traces print request headers (credentials)",
            extra={"action": "grpc_verbosity_limited", "requested": overridden},
        )
