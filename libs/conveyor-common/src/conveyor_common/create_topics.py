"""Create Conveyor's Kafka topics with the admin client: ``python -m conveyor_common.create_topics``.

The topics Job of a managed Kafka (``deploy/k8s/components/managed-kafka``) runs this from the
scheduler image: every topic of :mod:`conveyor_common.topics` (dead-letter twins included) with its
partition count, created when missing. Idempotent: existing topics with the right partition count
are left alone; one with another count is an error (exit 1, never changed silently). Exit 2 on bad
settings.

Settings (environment, ``TOPICS_`` prefix): ``KAFKA_BOOTSTRAP_SERVERS`` (required),
``REPLICATION_FACTOR`` (3), ``MIN_INSYNC_REPLICAS`` (2), ``TIMEOUT_SECONDS`` (60), and the client
security of every service: ``KAFKA_SECURITY_PROTOCOL`` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL),
``KAFKA_SASL_MECHANISM`` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), ``KAFKA_SASL_USERNAME``,
``KAFKA_SASL_PASSWORD`` (or ``KAFKA_SASL_PASSWORD_FILE``), ``KAFKA_SSL_CAFILE``,
``KAFKA_SSL_CERTFILE``, ``KAFKA_SSL_KEYFILE``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor_common import topics as conveyor_topics

log = logging.getLogger("conveyor.topics")
TOPIC_ALREADY_EXISTS = 36


class TopicsSettings(BaseSettings):
    """Settings of the topics Job."""

    model_config = SettingsConfigDict(env_prefix="TOPICS_", extra="ignore")

    kafka_bootstrap_servers: str = Field(description="Kafka bootstrap servers (required).")
    replication_factor: int = Field(default=3, ge=1)
    min_insync_replicas: int = Field(default=2, ge=1)
    timeout_seconds: float = Field(default=60.0, gt=0)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TopicsSettings:
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError("min_insync_replicas cannot exceed replication_factor")
        if self.kafka_security_protocol.startswith("SASL_"):
            if not self.kafka_sasl_mechanism or not self.kafka_sasl_username:
                raise ValueError("SASL needs KAFKA_SASL_MECHANISM and KAFKA_SASL_USERNAME")
            if self.kafka_sasl_password is None and self.kafka_sasl_password_file is None:
                raise ValueError("SASL needs KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE")
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError("a client certificate needs both KAFKA_SSL_CERTFILE and _KEYFILE")
        return self

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of aiokafka clients for the configured security."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(
                cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None
            )
            if self.kafka_ssl_certfile and self.kafka_ssl_keyfile:
                context.load_cert_chain(str(self.kafka_ssl_certfile), str(self.kafka_ssl_keyfile))
            kw["ssl_context"] = context
        if self.kafka_security_protocol.startswith("SASL_"):
            password = (
                self.kafka_sasl_password.get_secret_value()
                if self.kafka_sasl_password is not None
                else Path(str(self.kafka_sasl_password_file)).read_text().strip()
            )
            kw |= {
                "sasl_mechanism": self.kafka_sasl_mechanism,
                "sasl_plain_username": self.kafka_sasl_username,
                "sasl_plain_password": password,
            }
        return kw


class TopicsError(RuntimeError):
    """A topic could not be created or exists with another partition count."""


async def ensure_topics(
    client_kwargs: Mapping[str, Any],
    wanted: Mapping[str, int],
    *,
    replication_factor: int,
    config: Mapping[str, str] | None = None,
    timeout_seconds: float = 60.0,
) -> list[str]:
    """Create the missing ``{name: partitions}`` topics; return the names created."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    timeout_ms = int(timeout_seconds * 1000)
    admin = AIOKafkaAdminClient(**client_kwargs, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, n, replication_factor, topic_configs=dict(config or {}))
            for name, n in wanted.items()
            if name not in existing
        ]
        if missing:
            response = await admin.create_topics(missing, timeout_ms=timeout_ms)
            for err in response.to_object()["topic_errors"]:
                if err["error_code"] not in (0, TOPIC_ALREADY_EXISTS):
                    raise TopicsError(
                        f"creating topic {err['topic']!r} failed: error {err['error_code']} "
                        f"{err.get('error_message') or ''}"
                    )
        deadline = time.monotonic() + timeout_seconds
        pending = dict(wanted)
        while pending:
            for topic in await admin.describe_topics(list(pending)):
                name, parts = topic["topic"], topic["partitions"]
                if topic["error_code"] != 0 or not parts:
                    continue
                if len(parts) != pending[name]:
                    raise TopicsError(
                        f"topic {name!r} exists with {len(parts)} partitions, expected "
                        f"{pending[name]}"
                    )
                if all(p["leader"] >= 0 for p in parts):
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise TopicsError(f"topics without leaders after the timeout: {sorted(pending)}")
            if pending:
                await asyncio.sleep(0.2)
        return [t.name for t in missing]
    finally:
        await admin.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        settings = TopicsSettings()  # type: ignore[call-arg]
    except ValidationError as exc:
        for err in exc.errors():
            field = "_".join(str(p) for p in err["loc"]).upper()
            name = f"TOPICS_{field}" if field else "TOPICS_*"
            sys.stderr.write(f"bad setting {name}: {err['msg']}\n")
        return 2
    wanted = conveyor_topics.all_topics()
    try:
        created = asyncio.run(
            ensure_topics(
                settings.client_kwargs(),
                wanted,
                replication_factor=settings.replication_factor,
                config={"min.insync.replicas": str(settings.min_insync_replicas)},
                timeout_seconds=settings.timeout_seconds,
            )
        )
    except TopicsError as exc:
        log.error(json.dumps({"message": str(exc), "action": "topics_failed"}))
        return 1
    log.info(
        json.dumps(
            {
                "message": "topics ready",
                "action": "topics_ready",
                "created": created,
                "topics": sorted(wanted),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
