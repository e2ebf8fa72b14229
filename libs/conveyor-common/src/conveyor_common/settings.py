"""Settings from the environment, validated at start.

Each service subclasses :class:`ServiceSettings` with its own ``env_prefix`` (``SCHEDULER_``,
``GATEWAY_``...). Secrets are ``SecretStr`` fields **without defaults**: a missing secret stops the
service at start with a message naming the variable. :func:`load_settings` turns validation errors into
that message and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from typing import Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

T = TypeVar("T", bound=BaseSettings)


class ServiceSettings(BaseSettings):
    """Settings every service has. Subclasses set ``model_config`` with their env prefix."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", use_attribute_docstrings=True)

    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    """Log level of the JSON logs."""
    grpc_host: str = "0.0.0.0"
    """Address the gRPC server binds."""
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port (0 = any free port, for tests)."""
    metrics_host: str = "0.0.0.0"
    """Address the /metrics server binds (127.0.0.1 for local runs)."""
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint (0 = any free port; -1 is not allowed)."""
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=300)
    """Grace period for in-flight RPCs on SIGTERM."""
    readiness_drain_seconds: float = Field(default=0.0, ge=0, le=60)
    """How long to keep serving after health turns NOT_SERVING (the readiness probe period)."""
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The asyncio event loop: ``uvloop`` (libuv, the default) or the standard library's."""


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable that sets ``field`` of ``cls``."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    return (prefix + field).upper()


def load_settings(cls: type[T]) -> T:
    """Build settings from the environment or exit(2) with the variables that are missing or bad."""
    try:
        return cls()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            if not field:  # a check across fields: its message names the variables
                lines.append("  " + err["msg"].removeprefix("Value error, "))
                continue
            lines.append(f"  {env_name(cls, field)}: {err['msg']}")
        sys.stderr.write(f"{cls.__name__}: invalid configuration:\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None
