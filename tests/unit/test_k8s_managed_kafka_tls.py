"""Managed Kafka (no Strimzi, a topics Job, secure clients) and TLS (the gateway's issuer, mTLS inside)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.unit.k8s_support import K8S, ROOT, config_of, label, named, of_kind, render

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
