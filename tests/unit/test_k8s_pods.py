"""Pods: hardening, probes, resources, graceful shutdown, settings and secrets, images, the migration Job."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conveyor_scheduler.client_webhooks.settings import WebhookSettings
from tests.unit.k8s_support import (
    ALL,
    CONSUMER_STOP_SECONDS,
    CONTRACT,
    KAFKA_CONSUMERS,
    ROOT,
    SECRETISH,
    SETTINGS,
    config_of,
    ids,
    label,
    named,
    of_kind,
    pod_specs,
    render,
)

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
