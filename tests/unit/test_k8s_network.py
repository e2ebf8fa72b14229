"""Services, disruption budgets, topics, the in-cluster PostgreSQL and network policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conveyor_common import topics
from tests.unit.k8s_support import ALL, K8S, SERVICES, ids, label, named, of_kind, pod_specs, render

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
