"""The whole system through a SASL_SSL Kafka: SCRAM-SHA-512 users, a throwaway CA, no PLAINTEXT listener.

A broker of its own (the devstack's ``security="SASL_SSL"`` local process) serves every service:
schedulers, adapter and notifier connect with their ``<PREFIX>KAFKA_*`` security settings (password
from a file, the devstack CA), topics are created through it, and a task goes end to end (gateway ->
scheduler -> Kafka -> adapter -> fake Replicate -> webhooks -> Kafka -> scheduler -> Kafka -> notifier
-> watch). A wrong password is refused with an error that says so, by a client and by a service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor_client import AsyncConveyorClient
from conveyor_common.kafka import EventProducer, KafkaStartError, ProducerConfig
from conveyor_common.kafka.security import security_env
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka import KafkaServer
from conveyor_devstack.postgres import PostgresServer
from conveyor_devstack.stack import Devstack, start_kafka_async
from conveyor_devstack.system import ConveyorSystem, SystemConfig

pytestmark = [pytest.mark.integration]

_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def secure_kafka() -> AsyncIterator[KafkaServer]:
    """A broker whose only client listener is SASL_SSL (SCRAM-SHA-512)."""
    try:
        kafka = await start_kafka_async(security="SASL_SSL")
    except (DevstackError, OSError) as exc:
        if os.environ.get("CONVEYOR_ALLOW_SKIP") == "1":
            pytest.skip(f"SASL_SSL kafka could not start: {exc}")
        raise
    try:
        yield kafka
    finally:
        await asyncio.to_thread(kafka.close)


async def test_the_whole_system_runs_through_sasl_ssl(
    secure_kafka: KafkaServer, devstack_postgres: PostgresServer, tmp_path: Path
) -> None:
    assert secure_kafka.security.protocol == "SASL_SSL"
    assert secure_kafka.security.sasl_mechanism == "SCRAM-SHA-512"
    config = SystemConfig(
        schedulers=1,
        adapters=1,
        notifiers=1,
        gateways=1,
        run_dir=tmp_path / "system",
        fake={"min_duration_s": 0.2, "max_duration_s": 0.4},
    )
    async with ConveyorSystem.run(
        config, devstack=Devstack(devstack_postgres, secure_kafka)
    ) as system:
        for name, prefix in (
            ("scheduler-1", "SCHEDULER_"),
            ("adapter-1", "ADAPTER_"),
            ("notifier-1", "NOTIFIER_"),
        ):
            env = system.process(name).env
            assert env[f"{prefix}KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
            assert env[f"{prefix}KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
            assert env[f"{prefix}KAFKA_SASL_PASSWORD_FILE"] == str(secure_kafka.password_file)
            assert f"{prefix}KAFKA_SASL_PASSWORD" not in env  # the secret is not in the env
        assert system.endpoints.kafka_security == "SASL_SSL SCRAM-SHA-512 user=conveyor"

        admin = AsyncConveyorClient(system.gateway_address, system.mint_token("ops", role="admin"))
        client = AsyncConveyorClient(system.gateway_address, system.mint_token("sasl-tenant"))
        try:
            await admin.upsert_tenant("sasl-tenant", tier="free")
            submitted = await client.submit(
                "image", model="sasl/sdxl", input={"prompt": "a lighthouse behind TLS"}
            )
            task_id = submitted.task.task_id
            async with asyncio.timeout(60):
                events = [event async for event in client.watch(task_id)]
        finally:
            await client.close()
            await admin.close()
        kinds = [task_pb2.TaskEventType.Name(e.type) for e in events]
        assert kinds[0] == "TASK_EVENT_TYPE_SUBMITTED"
        assert "TASK_EVENT_TYPE_DISPATCHED" in kinds  # scheduler -> Kafka -> adapter
        assert kinds[-1] == "TASK_EVENT_TYPE_SUCCEEDED"  # adapter -> Kafka -> scheduler
        assert events[-1].task.result.files  # outputs copied by the adapter
        assert system.exited() == {}


async def test_a_client_without_the_right_credentials_is_refused_clearly(
    secure_kafka: KafkaServer,
) -> None:
    wrong = dataclasses.replace(secure_kafka.security, sasl_password="not-the-password")
    producer = EventProducer(
        ProducerConfig(secure_kafka.bootstrap, "wrong-password", security=wrong), source="/tests"
    )
    with pytest.raises(KafkaStartError) as refused:
        await producer.start()
    message = str(refused.value)
    assert "SASL_SSL SCRAM-SHA-512 user=conveyor" in message
    assert "authentication refused" in message
    assert "invalid credentials" in message

    plaintext = EventProducer(
        ProducerConfig(secure_kafka.bootstrap, "plaintext", request_timeout_ms=5000),
        source="/tests",
    )
    with pytest.raises(KafkaStartError, match=r"\(PLAINTEXT\)"):
        await plaintext.start()

    good = EventProducer(
        ProducerConfig(secure_kafka.bootstrap, "right-password", security=secure_kafka.security),
        source="/tests",
    )
    await good.start()  # the same broker takes the right password
    await good.stop()


async def test_a_service_with_a_wrong_password_stops_at_start_saying_why(
    secure_kafka: KafkaServer, tmp_path: Path
) -> None:
    password_file = tmp_path / "wrong.password"
    password_file.write_text("not-the-password\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
    env.update(security_env("NOTIFIER_", secure_kafka.security, password_file=password_file))
    env.update(
        {
            "NOTIFIER_KAFKA_BOOTSTRAP_SERVERS": secure_kafka.bootstrap,
            "NOTIFIER_SCHEDULER_ADDRESS": "127.0.0.1:1",
            "NOTIFIER_GRPC_HOST": "127.0.0.1",
            "NOTIFIER_GRPC_PORT": "0",
            "NOTIFIER_METRICS_HOST": "127.0.0.1",
            "NOTIFIER_METRICS_PORT": "0",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conveyor_notifier",
        env=env,
        cwd=_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(60):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = output.decode(errors="replace")
    assert proc.returncode != 0, text
    assert '"action": "kafka_start_failed"' in text, text  # a JSON log line, not only a traceback
    assert "cannot connect to Kafka" in text, text
    assert "authentication refused" in text, text
    assert "invalid credentials" in text, text
