"""Keep credentials out of every log: a redacting log filter and gRPC C-core log limits.

A credential can reach a log through layers we do not write: gRPC's Python layer logs a metadata
value it cannot decode whole (``grpc._cython.cygrpc`` at ERROR: ``Invalid encoding on b'Bearer
eyJ...\\xff'``), and gRPC's C core prints every received header, ``authorization`` included, when
its tracers run at INFO/DEBUG (``GRPC_TRACE=...`` with ``GRPC_VERBOSITY=DEBUG``). So:

* :class:`RedactingFilter` sits on the one JSON handler (:func:`conveyor_common.logging.configure_logging`)
  and rewrites every record of every logger before it is formatted: the message with its arguments,
  the exception and stack text, and every extra string field. Bearer/Basic credentials, the value of
  an ``authorization`` header or key, and JWT-shaped strings become ``[REDACTED]``.
* :func:`limit_grpc_core_logs` keeps the C core at ERROR (its ERROR lines carry no metadata; its
  INFO trace lines do), whatever ``GRPC_VERBOSITY`` the environment asked for.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from typing import Any

REDACTED = "[REDACTED]"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # The value of an authorization header or key, in any quoting: "authorization: x",
    # ('authorization', 'x'), {"authorization": "x"}, authorization=x.
    (
        re.compile(
            r"""(?i)((?:proxy-)?authorization|x-api-key|api[_-]?key|cookie)"""
            r"""(['"]?\s*[:=,]\s*b?['"]?)[^'"\r\n,}\])]+"""
        ),
        rf"\1\2{REDACTED}",
    ),
    # A credential after an auth scheme: "Bearer <token>", "Basic <b64>".
    (re.compile(r"(?i)\b(bearer|basic)(\s+|%20)[^\s'\"]+"), rf"\1\2{REDACTED}"),
    # JWT-shaped strings (JOSE header '{"' is base64url 'eyJ'), also cut after the payload.
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*)?"), REDACTED),
)


def redact(text: str) -> str:
    """``text`` with every credential-shaped substring replaced by ``[REDACTED]``."""
    if not text:
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        return redact(repr(value))
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """Removes credentials from a record: message, arguments, exception, stack, extra fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):
            record.msg = _redact_value(record.msg)
        else:
            try:
                message = record.getMessage()
            except Exception:  # a bad format string: keep what can be shown
                message = f"{record.msg!s} {record.args!r}"
            record.msg = redact(message)
            record.args = None
        if record.exc_info:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str | bytes | dict | list | tuple):
                setattr(record, key, _redact_value(value))
        return True


QUIET_GRPC_VERBOSITY = frozenset({"ERROR", "NONE"})
_overridden: list[str] = []


def limit_grpc_core_logs(environ: Any = None) -> str | None:
    """Keep gRPC's C core at ERROR (or NONE): its INFO/DEBUG trace lines print request headers.

    Must run before the first gRPC channel or server is made (the core reads the variable when it
    initialises: a service's ``__main__`` calls it before its other imports). Returns the value it
    overrode (also on later calls, so :func:`~conveyor_common.logging.configure_logging` can say so).
    """
    env = os.environ if environ is None else environ
    current = env.get("GRPC_VERBOSITY", "").strip().upper()
    if current not in QUIET_GRPC_VERBOSITY:
        env["GRPC_VERBOSITY"] = "ERROR"
        if current and environ is None:
            _overridden.append(current)
        if environ is not None:
            return current or None
    return _overridden[0] if _overridden and environ is None else None
