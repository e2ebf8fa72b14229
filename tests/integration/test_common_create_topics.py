"""The topics Job's entrypoint (``python -m conveyor_common.create_topics``) on a real Kafka:
creates what is missing with its configuration, is idempotent, refuses a partition mismatch and
bad settings."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from conveyor_common import topics
from conveyor_common.create_topics import TopicsError, TopicsSettings, ensure_topics

pytestmark = pytest.mark.integration


def run(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOPICS_")}
    return subprocess.run(
        [sys.executable, "-m", "conveyor_common.create_topics"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_creates_missing_topics_with_their_config_once(kafka_bootstrap: str) -> None:
    name = f"create-topics-{uuid.uuid4().hex[:8]}"
    kwargs = TopicsSettings(kafka_bootstrap_servers=kafka_bootstrap).client_kwargs()
    wanted = {name: 3, f"{name}.dlq": 1}
    config = {"min.insync.replicas": "1", "retention.ms": "3600000"}
    created = await ensure_topics(kwargs, wanted, replication_factor=1, config=config)
    assert sorted(created) == sorted(wanted)
    assert await ensure_topics(kwargs, wanted, replication_factor=1, config=config) == []
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        entries = {e[0]: e[1] for e in described[0].resources[0][4]}
        assert entries["retention.ms"] == "3600000"
    finally:
        await admin.close()
    with pytest.raises(TopicsError, match="exists with 3 partitions, expected 6"):
        await ensure_topics(kwargs, {name: 6}, replication_factor=1)


def test_the_module_creates_conveyors_topics_idempotently(kafka_bootstrap: str) -> None:
    env = {
        "TOPICS_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "TOPICS_REPLICATION_FACTOR": "1",
        "TOPICS_MIN_INSYNC_REPLICAS": "1",
        "TOPICS_TIMEOUT_SECONDS": "30",
    }
    first = run(**env)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run(**env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert '"created": []' in second.stdout
    for name in topics.all_topics():
        assert name in second.stdout


def test_bad_settings_exit_2_naming_the_variable() -> None:
    proc = run(TOPICS_KAFKA_SECURITY_PROTOCOL="SASL_SSL", TOPICS_KAFKA_BOOTSTRAP_SERVERS="k:9092")
    assert proc.returncode == 2
    assert "SASL needs" in proc.stderr
    missing = run()
    assert missing.returncode == 2
    assert "TOPICS_KAFKA_BOOTSTRAP_SERVERS" in missing.stderr
