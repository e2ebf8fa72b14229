"""A call whose connection went away before its status arrived fails, in grpc-core, with
``UNKNOWN "Stream removed"`` (grpc/grpc#34076), e.g. when the scheduler replica serving it is
killed. It is read as the UNAVAILABLE it means wherever we call another service: the gateway retries
it on another replica instead of answering INTERNAL, the adapter's submit protocol retries it, an
unexpected one is classified UNAVAILABLE, and the client SDK retries and resumes on it."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from conveyor.scheduler.v1 import scheduler_service_pb2 as s
from conveyor_client.errors import ConveyorError
from conveyor_client.errors import call_code as client_call_code
from conveyor_common.channels import call_code
from conveyor_common.errors import RpcError, Unavailable
from conveyor_common.faults import classify
from conveyor_gateway.downstream import SchedulerClient


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


STREAM_REMOVED = rpc_error(grpc.StatusCode.UNKNOWN, "Stream removed")


@pytest.mark.parametrize("read", [call_code, client_call_code])
def test_a_lost_connection_reads_as_unavailable_and_nothing_else_changes(read: Any) -> None:
    assert read(STREAM_REMOVED) == grpc.StatusCode.UNAVAILABLE
    # A handler's own UNKNOWN (a bug somewhere) stays UNKNOWN; other codes are untouched.
    assert read(rpc_error(grpc.StatusCode.UNKNOWN, "boom")) == grpc.StatusCode.UNKNOWN
    assert read(rpc_error(grpc.StatusCode.NOT_FOUND, "Stream removed")) == grpc.StatusCode.NOT_FOUND
    assert read(rpc_error(grpc.StatusCode.INTERNAL, "x")) == grpc.StatusCode.INTERNAL


def test_the_sdk_error_and_the_server_classification_see_unavailable() -> None:
    assert ConveyorError.from_rpc_error(STREAM_REMOVED).code == grpc.StatusCode.UNAVAILABLE
    assert isinstance(classify(STREAM_REMOVED), Unavailable)
    assert classify(rpc_error(grpc.StatusCode.UNKNOWN, "boom")) is None


class _Flaky:
    """A stub method failing with a lost connection ``failures`` times, then answering."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self, request: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise STREAM_REMOVED
        return "answer"


async def test_the_gateway_retries_a_lost_connection_on_another_attempt() -> None:
    client = SchedulerClient("ipv4:127.0.0.1:1,127.0.0.1:2", attempts=4, base_delay=0.001)
    flaky = _Flaky(failures=2)
    try:
        answer: str = await client.call(
            lambda stub: flaky, s.SchedulerServiceGetTaskRequest(), None
        )
    finally:
        await client.close()
    assert answer == "answer"
    assert flaky.calls == 3


async def test_a_lost_connection_on_every_attempt_is_unavailable_not_internal() -> None:
    client = SchedulerClient("ipv4:127.0.0.1:1,127.0.0.1:2", attempts=2, base_delay=0.001)
    flaky = _Flaky(failures=10)
    try:
        with pytest.raises(RpcError) as caught:
            await client.call(lambda stub: flaky, s.SchedulerServiceGetTaskRequest(), None)
    finally:
        await client.close()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert flaky.calls == 2


async def test_the_adapters_submit_protocol_retries_a_lost_connection() -> None:
    from conveyor_provider_adapter.coordination import Coordinator

    coordinator = Coordinator("127.0.0.1:1", adapter_id="a", retry_s=5.0)
    flaky = _Flaky(failures=2)
    try:
        assert await coordinator._retry("Test", lambda: flaky(None)) == "answer"
    finally:
        await coordinator.close()
    assert flaky.calls == 3


def test_a_session_the_server_ended_for_a_stalled_transaction_is_unavailable() -> None:
    """A process starved of CPU past ``idle_in_transaction_session_timeout`` finds its session
    ended (SQLSTATE 25P03): a transient fault, UNAVAILABLE with RetryInfo, not INTERNAL; another
    invalid-transaction-state error (a bug) stays unrecognised."""
    import psycopg

    stalled = psycopg.errors.lookup("25P03")("terminating connection due to idle-in-transaction")
    assert isinstance(classify(stalled), Unavailable)
    assert classify(psycopg.errors.lookup("25001")("active sql transaction")) is None
