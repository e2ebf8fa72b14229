"""Unit tests of the SDK's typed layer, token handling, retry policy, and the CLI's rendering."""

from __future__ import annotations

import base64
import inspect
import json
import time
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from conveyor.tasks.v1 import task_pb2
from conveyor_client import (
    AsyncClient,
    AsyncConveyorClient,
    Client,
    ConveyorError,
    EventType,
    Priority,
    Task,
    TaskEvent,
    TaskStatus,
    Violation,
)
from conveyor_client.cli import _error_line, main
from conveyor_client.cli_output import Output, progress_label
from conveyor_client.options import (
    _chunk_request_id,
    _TokenSource,
    channel_options_from_env,
    token_expiry,
)


def _jwt(exp: float) -> str:
    def part(doc: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'exp': exp})}.sig"


def test_sync_and_async_clients_have_one_surface() -> None:
    def surface(cls: type) -> dict[str, list[tuple[str, object]]]:
        out = {}
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_"):
                continue
            params = list(inspect.signature(fn).parameters.values())[1:]
            out[name] = [(p.name, p.default) for p in params]
        return out

    assert surface(Client) == surface(AsyncClient)
    assert {"submit", "submit_batch", "watch", "watch_many", "wait", "close"} <= set(
        surface(Client)
    )
    assert list(inspect.signature(Client.from_env).parameters) == list(
        inspect.signature(AsyncClient.from_env).parameters
    )


def test_enums_have_one_spelling_in_and_out() -> None:
    assert TaskStatus.from_proto(task_pb2.TASK_STATUS_SUCCEEDED) == "succeeded"
    assert str(TaskStatus.DEAD_LETTERED) == "dead_lettered"
    for text in ("high", "HIGH", "PRIORITY_HIGH", task_pb2.PRIORITY_HIGH):
        assert Priority.parse(text) is Priority.HIGH
    assert Priority.HIGH.proto == task_pb2.PRIORITY_HIGH
    assert TaskStatus.from_proto(99) is TaskStatus.UNSPECIFIED
    with pytest.raises(ValueError, match="urgent, high, normal, low"):
        Priority.parse("asap")
    assert EventType.CANCELED.terminal
    assert not EventType.CANCEL_REQUESTED.terminal


def _task_proto(task_id: str = "01933f00-0000-7000-8000-00000000abcd") -> task_pb2.Task:
    msg = task_pb2.Task(
        task_id=task_id,
        tenant_id="acme",
        status=task_pb2.TASK_STATUS_DEAD_LETTERED,
        attempt=3,
        max_attempts=3,
        last_sequence=12,
    )
    msg.spec.kind = task_pb2.TASK_KIND_IMAGE
    msg.spec.model = "acme/sdxl"
    msg.error.code = "provider_error"
    msg.error.message = "CUDA out of memory"
    msg.created_at.CopyFrom(timestamp_pb2.Timestamp(seconds=1_700_000_000))
    return msg


def test_task_dict_uses_names_numbers_and_utc_times() -> None:
    task = Task.from_proto(_task_proto())
    data = task.to_dict()
    assert data["status"] == "dead_lettered"
    assert data["kind"] == "image"
    assert data["last_sequence"] == 12
    assert data["created_at"] == "2023-11-14T22:13:20Z"
    assert data["error"] == {
        "code": "provider_error",
        "message": "CUDA out of memory",
        "retryable": False,
    }
    assert "proto" not in data
    json.dumps(data)


def test_cancel_requested_follows_the_watch_until_the_end() -> None:
    running = task_pb2.TaskEvent(
        sequence=4, type=task_pb2.TASK_EVENT_TYPE_CANCEL_REQUESTED, task=task_pb2.Task()
    )
    running.task.status = task_pb2.TASK_STATUS_RUNNING
    event = TaskEvent.from_proto(running)
    assert event.task.cancel_requested
    done = task_pb2.TaskEvent(sequence=5, type=task_pb2.TASK_EVENT_TYPE_CANCELED)
    done.task.status = task_pb2.TASK_STATUS_CANCELED
    assert not TaskEvent.from_proto(done, cancel_requested=True).task.cancel_requested


def test_token_provider_is_asked_again_only_near_expiry() -> None:
    calls: list[float] = []

    def provider() -> str:
        exp = time.time() + (3600 if not calls else 30)
        calls.append(exp)
        return _jwt(exp)

    source = _TokenSource(provider, margin=60)
    first = source.get()
    assert source.get() == first  # an hour left: cached
    assert len(calls) == 1
    source.expires_at = time.time() + 10  # inside the margin
    assert source.get() != first
    assert len(calls) == 2
    assert token_expiry("not-a-jwt") is None
    assert token_expiry(_jwt(123)) == 123
    static = _TokenSource("abc", margin=60)
    assert static.get() == "abc"
    assert not static.invalidate()


async def test_retry_policy_honours_retry_info() -> None:
    client = AsyncConveyorClient("127.0.0.1:1", "t", retries=2)
    try:
        exhausted = ConveyorError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down")
        assert client._retry_delay(exhausted, 0) is None  # no RetryInfo: final
        exhausted.retry_after_seconds = 1.5
        delay = client._retry_delay(exhausted, 0)
        assert delay is not None
        assert 1.5 <= delay <= 1.65
        assert client._retry_delay(exhausted, 2) is None  # attempts used up
        client.retry_resource_exhausted = False
        assert client._retry_delay(exhausted, 0) is None
        unavailable = ConveyorError(grpc.StatusCode.UNAVAILABLE, "down")
        assert client._retry_delay(unavailable, 0) is not None
        assert client._retry_delay(ConveyorError(grpc.StatusCode.INTERNAL, "x"), 0) is None
    finally:
        await client.close()


def test_batch_chunk_request_ids_are_deterministic() -> None:
    assert _chunk_request_id("abc", 0) == "abc"
    assert _chunk_request_id("abc", 1) == _chunk_request_id("abc", 1)
    assert _chunk_request_id("abc", 1) != _chunk_request_id("abc", 2)
    assert len(_chunk_request_id("x" * 128, 3)) <= 128


def test_from_env_reads_address_token_and_tls(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    address, token, creds = channel_options_from_env(
        {"CONVEYOR_ADDRESS": "gw:443", "CONVEYOR_TOKEN": "tok", "CONVEYOR_CA_FILE": str(ca)}
    )
    assert (address, token) == ("gw:443", "tok")
    assert creds is not None
    assert channel_options_from_env({}) == ("127.0.0.1:50051", None, None)


def test_cli_error_line_names_each_field_once() -> None:
    err = ConveyorError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid request: spec.model: must be owner/name",
        field_violations=[
            Violation("spec.model", "must be owner/name"),
            Violation("spec.input", "too large"),
        ],
    )
    line = _error_line(err)
    assert "\n" not in line
    assert line.count("must be owner/name") == 1
    assert "spec.input: too large" in line


def test_dead_letter_table_has_tenant_and_error(capsys: pytest.CaptureFixture[str]) -> None:
    Output(as_json=False).dead_letters([Task.from_proto(_task_proto())])
    out = capsys.readouterr().out
    for text in ("tenant", "error", "acme", "CUDA out of memory", "3/3"):
        assert text in out


def test_progress_labels_tell_tasks_of_one_millisecond_apart() -> None:
    prefix = uuid.uuid4().hex[:12]
    a = f"{prefix[:8]}-{prefix[8:12]}-7000-8000-000000000001"
    b = f"{prefix[:8]}-{prefix[8:12]}-7000-8000-000000000002"
    assert progress_label(a, "acme/sdxl") != progress_label(b, "acme/sdxl")
    assert progress_label(a, "acme/sdxl").startswith("acme/sdxl")


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["list", "--status", "TASK_STATUS_QUEUED"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "invalid choice" in err


def test_a_closed_stdout_exits_141_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io
    import os
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: every write fails with EPIPE
    closed = io.TextIOWrapper(io.FileIO(write_end, "w", closefd=True))
    monkeypatch.setattr(sys, "stdout", closed)
    code = main(["--json", "token", "--secret", "s" * 40, "--tenant", "dev"])
    monkeypatch.undo()
    assert code == 141
    assert capsys.readouterr().err == ""
