"""No credential reaches a log from any layer (issue 15).

A valid bearer token followed by one byte that is not UTF-8, sent in a raw HTTP/2 header, used to be
written whole at ERROR by gRPC's Python layer (``grpc._cython.cygrpc``: ``Invalid encoding on
b'Bearer eyJ...'``); gRPC's C core prints every header at INFO when its tracers are on. The probe runs
against ``python -m conveyor_gateway`` with the C-core tracers asked for at DEBUG, and no part of the
token may appear in its stdout or stderr.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import socket
import sys
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor_common.logging import configure_logging
from conveyor_common.redact import REDACTED, RedactingFilter, limit_grpc_core_logs, redact
from conveyor_testkit.gateway import FakeScheduler, scheduler_binding, serve
from conveyor_testkit.tokens import AUDIENCE, HS_SECRET, ISSUER, Keys

TOKEN = Keys.generate().token("tenant-secret")
HEADER, PAYLOAD, SIGNATURE = TOKEN.split(".")


def _leaks(text: str) -> list[str]:
    """The parts of TOKEN found in ``text``."""
    return [part for part in (HEADER + "." + PAYLOAD, PAYLOAD, SIGNATURE) if part in text]


def test_redact_covers_the_shapes_a_credential_takes() -> None:
    samples = [
        f"Invalid encoding on b'Bearer {TOKEN}\\xff'",
        f"metadata (('authorization', 'Bearer {TOKEN}'),)",
        f'{{"authorization": "{TOKEN}"}}',
        "authorization: Basic dXNlcjpwYXNz, next",
        f"a bare jwt {TOKEN} in text",
        f"a truncated one {HEADER}.{PAYLOAD[:20]}",
    ]
    for sample in samples:
        out = redact(sample)
        assert REDACTED in out, sample
        assert not _leaks(out), out
        assert "dXNlcjpwYXNz" not in out
    assert redact("task 3f2a queued for acme/sdxl") == "task 3f2a queued for acme/sdxl"


def test_the_filter_redacts_message_args_exception_and_extra_fields() -> None:
    stream = io.StringIO()
    configure_logging("test", "INFO", stream=stream)
    log = logging.getLogger("grpc._cython.cygrpc")
    try:
        raise ValueError(f"bad header {TOKEN}")
    except ValueError:
        log.exception("Invalid encoding on %s", f"b'Bearer {TOKEN}\\xff'", extra={"meta": TOKEN})
    logging.getLogger("x").info({"authorization": f"Bearer {TOKEN}"})
    text = stream.getvalue()
    assert text.count(REDACTED) >= 4, text
    assert not _leaks(text), text
    assert any(isinstance(f, RedactingFilter) for f in logging.getLogger().handlers[0].filters)


def test_grpc_core_verbosity_is_kept_at_error() -> None:
    env = {"GRPC_VERBOSITY": "debug"}
    assert limit_grpc_core_logs(env) == "DEBUG"
    assert env["GRPC_VERBOSITY"] == "ERROR"
    env = {"GRPC_VERBOSITY": "NONE"}
    assert limit_grpc_core_logs(env) is None
    assert env["GRPC_VERBOSITY"] == "NONE"
    env = {}
    limit_grpc_core_logs(env)
    assert env["GRPC_VERBOSITY"] == "ERROR"


# -- the raw HTTP/2 probe against the gateway process ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_call(port: int, authorization: bytes) -> list[Any]:
    """One gRPC call over a raw HTTP/2 connection with an unvalidated authorization header."""
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    events: list[Any] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", b"/conveyor.tasks.v1.TaskService/GetQueueStats"),
                (b":authority", b"gateway"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"authorization", authorization),
            ],
        )
        conn.send_data(stream, b"\x00\x00\x00\x00\x00", end_stream=True)
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            if not data:
                break
            events.extend(conn.receive_data(data))
            sock.sendall(conn.data_to_send())
            if any(isinstance(e, h2.events.StreamEnded | h2.events.StreamReset) for e in events):
                break
    return events


async def test_raw_http2_probe_leaves_no_token_in_any_log() -> None:
    fakes = await serve(scheduler_binding(FakeScheduler()))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "GRPC_"))}
    env.update(
        GATEWAY_SCHEDULER_ADDRESS=f"127.0.0.1:{fakes.port}",
        GATEWAY_GRPC_HOST="127.0.0.1",
        GATEWAY_GRPC_PORT=str(port),
        GATEWAY_METRICS_PORT="0",
        GATEWAY_JWT_HS256_SECRET=HS_SECRET.decode(),
        GATEWAY_JWT_ISSUER=ISSUER,
        GATEWAY_JWT_AUDIENCE=AUDIENCE,
        # An operator asking for every C-core tracer: its INFO lines print each header.
        GRPC_VERBOSITY="DEBUG",
        GRPC_TRACE="all",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor_gateway", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health: Any = health_pb2_grpc.HealthStub(ch)
            for _ in range(150):
                try:
                    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
        for bad in (b"\xff", b"\x80", b"\xc3", b"\x00", b"\x01", b"\x7f", b" \xfe"):
            events = await asyncio.to_thread(raw_call, port, b"Bearer " + TOKEN.encode() + bad)
            assert any(isinstance(e, h2.events.ResponseReceived) for e in events), bad
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await fakes.stop(0)
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    # The probe reached the layer that used to log the whole value ...
    assert '"logger": "grpc._cython.cygrpc"' in stdout, stdout
    assert "Bearer [REDACTED]" in stdout, stdout
    # ... and the C core was held at ERROR although DEBUG was asked for.
    assert "grpc_verbosity_limited" in stdout
    assert "hpack_parser" not in stderr, stderr[:2000]
    assert not _leaks(stdout), [line for line in stdout.splitlines() if _leaks(line)]
    assert not _leaks(stderr), [line for line in stderr.splitlines() if _leaks(line)]
