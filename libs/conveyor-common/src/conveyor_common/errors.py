"""Rich gRPC errors (google.rpc.Status with details) and the mapping from exceptions to statuses.

Raise a :class:`RpcError` subclass anywhere in a handler; the error interceptor of
:mod:`conveyor_common.grpc_server` turns it into the status with its details. Any other exception
becomes INTERNAL with a generic message: never UNKNOWN, never a stack trace to the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "conveyor.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request."""

    field: str
    description: str


class RpcError(Exception):
    """An error that maps to a gRPC status with details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def details(self) -> list[any_pb2.Any]:
        """Detail messages besides ErrorInfo."""
        return []

    def to_status_proto(self) -> status_pb2.Status:
        """The google.rpc.Status: code, message, the details and an ErrorInfo with the reason."""
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN))
        return status_pb2.Status(
            code=self.code.value[0],
            message=self.message,
            details=[*self.details(), info],
        )

    def to_status(self) -> grpc.Status:
        """The rich status (google.rpc.Status in the grpc-status-details-bin trailer)."""
        result: grpc.Status = rpc_status.to_status(self.to_status_proto())
        return result


class InvalidArgument(RpcError):
    """INVALID_ARGUMENT with a BadRequest naming each bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation], message: str | None = None) -> None:
        self.violations = list(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations[:5])
        super().__init__(message or f"invalid request: {summary}")

    def details(self) -> list[any_pb2.Any]:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
        )
        return [detail]


@dataclass(frozen=True)
class QuotaViolation:
    """One exceeded quota."""

    subject: str
    description: str


class ResourceExhausted(RpcError):
    """RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"

    def __init__(
        self,
        violations: Sequence[QuotaViolation],
        retry_after_seconds: float,
        message: str | None = None,
    ) -> None:
        self.violations = list(violations)
        self.retry_after_seconds = max(0.0, retry_after_seconds)
        summary = "; ".join(f"{v.subject}: {v.description}" for v in self.violations)
        super().__init__(message or f"quota exceeded: {summary}")

    def details(self) -> list[any_pb2.Any]:
        quota, retry = any_pb2.Any(), any_pb2.Any()
        quota.Pack(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=v.subject, description=v.description
                    )
                    for v in self.violations
                ]
            )
        )
        seconds = int(self.retry_after_seconds)
        nanos = int((self.retry_after_seconds - seconds) * 1e9)
        retry.Pack(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos)
            )
        )
        return [quota, retry]


class NotFound(RpcError):
    """NOT_FOUND with ResourceInfo. Also the answer for another tenant's resource."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"

    def __init__(self, resource_type: str, resource_name: str, description: str = "") -> None:
        self.resource_type = resource_type
        self.resource_name = resource_name
        self.description = description
        message = f"{resource_type} {resource_name!r} not found"
        super().__init__(f"{message}: {description}" if description else message)

    def details(self) -> list[any_pb2.Any]:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.ResourceInfo(
                resource_type=self.resource_type,
                resource_name=self.resource_name,
                description=self.description,
            )
        )
        return [detail]


class FailedPrecondition(RpcError):
    """FAILED_PRECONDITION (e.g. an idempotency key reused with a different request)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class AlreadyExists(RpcError):
    """ALREADY_EXISTS."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class Unauthenticated(RpcError):
    """UNAUTHENTICATED: missing or bad credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(RpcError):
    """PERMISSION_DENIED: authenticated but not allowed (e.g. admin calls)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unavailable(RpcError):
    """UNAVAILABLE with RetryInfo: overloaded or a dependency is down; safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"

    def __init__(self, message: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[any_pb2.Any]:
        retry = any_pb2.Any()
        retry.Pack(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=max(0, int(self.retry_after_seconds)))
            )
        )
        return [retry]


def unpack_details(status: status_pb2.Status) -> dict[str, object]:
    """Decode the well-known details of a status into a dict keyed by message name."""
    out: dict[str, object] = {}
    kinds: Iterable[type] = (
        error_details_pb2.BadRequest,
        error_details_pb2.QuotaFailure,
        error_details_pb2.RetryInfo,
        error_details_pb2.ErrorInfo,
        error_details_pb2.ResourceInfo,
    )
    for detail in status.details:
        for kind in kinds:
            descriptor = kind.DESCRIPTOR  # type: ignore[attr-defined]
            if detail.Is(descriptor):
                msg = kind()
                detail.Unpack(msg)
                out[descriptor.name] = msg
    return out


CODE_NAMES = {v: k for k, v in code_pb2.Code.items()}
