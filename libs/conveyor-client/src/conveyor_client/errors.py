"""The SDK's error: a gRPC status with its rich details decoded."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


def call_code(exc: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call; grpc-core's ``UNKNOWN "Stream removed"`` (the connection
    went away before the status arrived, e.g. a gateway replica was killed: grpc/grpc#34076) is the
    UNAVAILABLE it means, so it is retried and resumed like any other transport failure."""
    code_fn = getattr(exc, "code", None)
    code: grpc.StatusCode = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.UNKNOWN:
        details_fn = getattr(exc, "details", None)
        if callable(details_fn) and details_fn() == "Stream removed":
            return grpc.StatusCode.UNAVAILABLE
    return code


@dataclass(frozen=True)
class Violation:
    """One bad field (BadRequest) or exceeded quota (QuotaFailure)."""

    field: str
    description: str


@dataclass(eq=False)
class ConveyorError(Exception):
    """A failed call: status code, message and the decoded details."""

    code: grpc.StatusCode
    message: str
    field_violations: list[Violation] = field(default_factory=list)
    quota_violations: list[Violation] = field(default_factory=list)
    retry_after_seconds: float | None = None
    reason: str = ""
    resource: str = ""

    def __post_init__(self) -> None:
        super().__init__(f"{self.code.name}: {self.message}")

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        for v in self.field_violations:
            text += f"\n  {v.field}: {v.description}"
        for v in self.quota_violations:
            text += f"\n  {v.field}: {v.description}"
        if self.retry_after_seconds is not None:
            text += f"\n  retry after {self.retry_after_seconds:.3g} s"
        return text

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> ConveyorError:
        """Decode a grpc (sync or aio) error, including grpc-status-details-bin."""
        code = call_code(exc)
        details_fn = getattr(exc, "details", None)
        message = (details_fn() if callable(details_fn) else None) or ""
        trailing_fn = getattr(exc, "trailing_metadata", None)
        trailing = (trailing_fn() if callable(trailing_fn) else None) or ()
        err = cls(code=code, message=message)
        for key, value in trailing:
            if key == DETAILS_KEY and isinstance(value, bytes):
                err._decode(status_pb2.Status.FromString(value))
        return err

    def _decode(self, status: status_pb2.Status) -> None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.field_violations.extend(
                    Violation(v.field, v.description) for v in bad.field_violations
                )
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                detail.Unpack(quota)
                self.quota_violations.extend(
                    Violation(v.subject, v.description) for v in quota.violations
                )
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                self.retry_after_seconds = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                self.reason = info.reason
            elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
                res = error_details_pb2.ResourceInfo()
                detail.Unpack(res)
                self.resource = f"{res.resource_type}/{res.resource_name}"
