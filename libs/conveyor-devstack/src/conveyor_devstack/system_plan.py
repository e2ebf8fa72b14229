"""Planning a system: every process's command line and environment (settings, secrets, TLS,
Kafka security), from the system's configuration and its devstack.

A mixin of :class:`~conveyor_devstack.system.ConveyorSystem`, which owns the state it reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from conveyor_common.kafka.security import security_env
from conveyor_common.tls import TlsFiles
from conveyor_devstack import _process
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka import KafkaServer
from conveyor_devstack.pki import LocalCA
from conveyor_devstack.processes import (
    ManagedProcess,
    SystemConfig,
    WebhookIngress,
    child_env,
    target_of,
)
from conveyor_devstack.stack import Devstack


class SystemPlan:
    """The planning half of :class:`~conveyor_devstack.system.ConveyorSystem`."""

    devstack: Devstack
    config: SystemConfig
    run_dir: Path
    jwt_secret: str
    fake_token: str
    fake_webhook_secret: str
    webhook_token_key: str
    secret_sealing_key: str
    database: str
    database_url: str
    fake_url: str
    processes: dict[str, ManagedProcess]
    ingress: WebhookIngress | None
    client_tls: TlsFiles | None

    def by_role(self, role: str) -> list[ManagedProcess]:
        """The processes of one role, in name order."""
        return [p for p in self.processes.values() if p.role == role]

    @property
    def gateway_address(self) -> str:
        """host:port of the first gateway."""
        return f"127.0.0.1:{self.by_role('gateway')[0].grpc_port}"

    def _kafka(self) -> KafkaServer:
        if self.devstack.kafka is None:
            raise DevstackError("the system needs a devstack with PostgreSQL and Kafka")
        return self.devstack.kafka

    def _kafka_env(self, prefix: str) -> dict[str, str]:
        """``<prefix>KAFKA_*`` security settings of a service (empty for PLAINTEXT)."""
        kafka = self._kafka()
        if kafka.security.protocol == "PLAINTEXT":
            return {}
        return security_env(prefix, kafka.security, password_file=kafka.password_file)

    def _plan(self) -> None:
        cfg = self.config
        py = sys.executable
        kafka = self.devstack.kafka_bootstrap
        level = cfg.log_level
        counts = {
            "scheduler": cfg.schedulers,
            "adapter": cfg.adapters,
            "notifier": cfg.notifiers,
            "gateway": cfg.gateways,
        }
        if min(counts.values()) < 1:
            raise DevstackError(f"every service needs at least one replica: {counts}")
        ports = iter(_process.free_ports(1 + 3 * sum(counts.values())))

        def add(role: str, index: int, argv: list[str], env: dict[str, str], **kw: Any) -> None:
            name = role if role == "fake" else f"{role}-{index}"
            self.processes[name] = ManagedProcess(
                name, role, argv, env, self.run_dir / f"{name}.log", **kw
            )

        fake_port = next(ports)
        fake_args = [py, "-m", "fake_replicate", "--host", "127.0.0.1", "--port", str(fake_port)]
        fake_args += ["--log-level", level]
        fake_env = {
            "FAKE_REPLICATE_TOKEN": self.fake_token,
            "FAKE_REPLICATE_WEBHOOK_SECRET": self.fake_webhook_secret,
        }
        for key, value in cfg.fake.items():
            raw = json.dumps(value) if isinstance(value, list | dict | bool) else str(value)
            fake_env["FAKE_REPLICATE_" + key.upper()] = raw
        add("fake", 0, fake_args, child_env(fake_env), http_port=fake_port)

        sched_grpc = [next(ports) for _ in range(cfg.schedulers)]
        scheduler_target = target_of(sched_grpc)
        for i, port in enumerate(sched_grpc, 1):
            env = {
                "SCHEDULER_DATABASE_URL": "",  # set once the database exists
                "SCHEDULER_KAFKA_BOOTSTRAP_SERVERS": kafka,
                **self._kafka_env("SCHEDULER_"),
                "SCHEDULER_GRPC_HOST": "127.0.0.1",
                "SCHEDULER_GRPC_PORT": str(port),
                "SCHEDULER_METRICS_PORT": str(next(ports)),
                "SCHEDULER_METRICS_HOST": "127.0.0.1",
                "SCHEDULER_INSTANCE_ID": f"scheduler-{i}",
                "SCHEDULER_LOG_LEVEL": level,
                "SCHEDULER_SHUTDOWN_GRACE_SECONDS": "2",
                "SCHEDULER_KAFKA_SESSION_TIMEOUT_MS": "3000",
                "SCHEDULER_WEBHOOK_SECRET_KEYS": self.secret_sealing_key,
                **({"SCHEDULER_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"} if cfg.loopback_webhooks else {}),
                **cfg.scheduler_env,
            }
            add(
                "scheduler",
                i,
                [py, "-m", "conveyor_scheduler"],
                child_env(env),
                grpc_port=port,
                metrics_port=int(env["SCHEDULER_METRICS_PORT"]),
            )

        for i in range(1, cfg.adapters + 1):
            env = {
                "ADAPTER_REPLICATE_API_TOKEN": self.fake_token,
                "ADAPTER_REPLICATE_BASE_URL": "",  # the fake's URL, once it listens
                "ADAPTER_REPLICATE_WEBHOOK_SECRET": self.fake_webhook_secret,
                "ADAPTER_WEBHOOK_PUBLIC_BASE_URL": "",  # the ingress, once it listens
                "ADAPTER_WEBHOOK_TOKEN_KEY": self.webhook_token_key,
                "ADAPTER_WEBHOOK_HOST": "127.0.0.1",
                "ADAPTER_WEBHOOK_PORT": str(next(ports)),
                "ADAPTER_SCHEDULER_ADDRESS": scheduler_target,
                "ADAPTER_KAFKA_BOOTSTRAP": kafka,
                **self._kafka_env("ADAPTER_"),
                "ADAPTER_KAFKA_SESSION_TIMEOUT_MS": "3000",
                "ADAPTER_ADAPTER_ID": f"adapter-{i}",
                "ADAPTER_GRPC_HOST": "127.0.0.1",
                "ADAPTER_GRPC_PORT": str(next(ports)),
                "ADAPTER_METRICS_PORT": str(next(ports)),
                "ADAPTER_METRICS_HOST": "127.0.0.1",
                "ADAPTER_LOG_LEVEL": level,
                "ADAPTER_STORAGE_BACKEND": "filesystem",
                "ADAPTER_STORAGE_FS_ROOT": str(self.run_dir / "outputs"),
                "ADAPTER_OUTPUT_ALLOWED_HOSTS": "127.0.0.1",
                "ADAPTER_OUTPUT_ALLOW_HTTP": "true",
                # Local runs: lost webhooks are noticed in seconds, not minutes.
                "ADAPTER_RECONCILE_INTERVAL_S": "5",
                "ADAPTER_WEBHOOK_OVERDUE_S": "20",
                "ADAPTER_SHUTDOWN_GRACE_SECONDS": "2",
                **cfg.adapter_env,
            }
            add(
                "adapter",
                i,
                [py, "-m", "conveyor_provider_adapter"],
                child_env(env),
                grpc_port=int(env["ADAPTER_GRPC_PORT"]),
                metrics_port=int(env["ADAPTER_METRICS_PORT"]),
                http_port=int(env["ADAPTER_WEBHOOK_PORT"]),
            )
        self.ingress = WebhookIngress(self.by_role("adapter"))

        notifier_grpc = [next(ports) for _ in range(cfg.notifiers)]
        for i, port in enumerate(notifier_grpc, 1):
            env = {
                "NOTIFIER_KAFKA_BOOTSTRAP_SERVERS": kafka,
                **self._kafka_env("NOTIFIER_"),
                "NOTIFIER_SCHEDULER_ADDRESS": scheduler_target,
                "NOTIFIER_REPLICA_ID": f"notifier-{i}",
                "NOTIFIER_GRPC_HOST": "127.0.0.1",
                "NOTIFIER_GRPC_PORT": str(port),
                "NOTIFIER_METRICS_PORT": str(next(ports)),
                "NOTIFIER_METRICS_HOST": "127.0.0.1",
                "NOTIFIER_LOG_LEVEL": level,
                "NOTIFIER_SHUTDOWN_GRACE_SECONDS": "2",
                **(
                    {
                        "NOTIFIER_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
                        "NOTIFIER_RETRY_BASE_SECONDS": "1",
                    }
                    if cfg.loopback_webhooks
                    else {}
                ),
                **cfg.notifier_env,
            }
            add(
                "notifier",
                i,
                [py, "-m", "conveyor_notifier"],
                child_env(env),
                grpc_port=port,
                metrics_port=int(env["NOTIFIER_METRICS_PORT"]),
            )

        for i in range(1, cfg.gateways + 1):
            port = next(ports)
            env = {
                "GATEWAY_SCHEDULER_ADDRESS": scheduler_target,
                "GATEWAY_NOTIFIER_ADDRESS": target_of(notifier_grpc),
                "GATEWAY_JWT_HS256_SECRET": self.jwt_secret,
                "GATEWAY_GRPC_HOST": "127.0.0.1",
                "GATEWAY_GRPC_PORT": str(port),
                "GATEWAY_METRICS_PORT": str(next(ports)),
                "GATEWAY_METRICS_HOST": "127.0.0.1",
                "GATEWAY_LOG_LEVEL": level,
                "GATEWAY_SHUTDOWN_GRACE_SECONDS": "2",
                **(
                    {"GATEWAY_URL_ALLOWED_HOSTS": '["127.0.0.1"]', "GATEWAY_URL_ALLOW_HTTP": "true"}
                    if cfg.loopback_webhooks
                    else {}
                ),
                **cfg.gateway_env,
            }
            add(
                "gateway",
                i,
                [py, "-m", "conveyor_gateway"],
                child_env(env),
                grpc_port=port,
                metrics_port=int(env["GATEWAY_METRICS_PORT"]),
            )
        for p in self.by_role("scheduler"):
            p.env["SCHEDULER_DATABASE_URL"] = self.database_url
        if cfg.internal_tls:
            self._plan_internal_tls()

    def _plan_internal_tls(self) -> None:
        """A CA, one certificate per service kind, and the settings that turn mutual TLS on
        (explicit ``*_env`` overrides still win)."""
        ca = LocalCA.create(self.run_dir / "pki")
        allowed = {
            "scheduler": ("SCHEDULER_", ["gateway", "provider-adapter", "notifier"]),
            "adapter": ("ADAPTER_", []),
            "notifier": ("NOTIFIER_", ["gateway"]),
        }
        overrides = {
            "scheduler": self.config.scheduler_env,
            "adapter": self.config.adapter_env,
            "notifier": self.config.notifier_env,
            "gateway": self.config.gateway_env,
        }
        for role, (prefix, peers) in allowed.items():
            issued = ca.issue("provider-adapter" if role == "adapter" else role)
            for p in self.by_role(role):
                p.env.update(
                    {
                        f"{prefix}TLS_CERT_FILE": str(issued.cert),
                        f"{prefix}TLS_KEY_FILE": str(issued.key),
                        f"{prefix}TLS_CA_FILE": str(ca.cert_path),
                        f"{prefix}TLS_ALLOWED_PEERS": json.dumps(peers),
                        # Targets list several IPs (no host name): every certificate names
                        # localhost.
                        f"{prefix}TLS_SERVER_NAME": "localhost",
                    }
                )
                p.env.update(overrides[role])
        gateway = ca.issue("gateway")
        for p in self.by_role("gateway"):
            p.env.update(
                {
                    "GATEWAY_INTERNAL_TLS_CERT_FILE": str(gateway.cert),
                    "GATEWAY_INTERNAL_TLS_KEY_FILE": str(gateway.key),
                    "GATEWAY_INTERNAL_TLS_CA_FILE": str(ca.cert_path),
                    "GATEWAY_INTERNAL_TLS_SERVER_NAME": "localhost",
                }
            )
            p.env.update(overrides["gateway"])
        probe = ca.issue("devstack")
        self.client_tls = TlsFiles(probe.cert, probe.key, ca.cert_path)

    def _set_ingress_env(self) -> None:
        assert self.ingress is not None
        for p in self.by_role("adapter"):
            p.env["ADAPTER_REPLICATE_BASE_URL"] = self.fake_url
            p.env["ADAPTER_WEBHOOK_PUBLIC_BASE_URL"] = f"http://127.0.0.1:{self.ingress.port}"
