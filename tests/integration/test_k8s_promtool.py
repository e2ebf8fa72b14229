"""promtool on the alert rules and on every other PromQL expression we ship.

``promtool`` comes from Debian's ``prometheus`` package (``tools/k8s/install-tools.sh``, run by
``make setup``). The PrometheusRule's ``spec`` is the rule file; ``rules/alerts.test.yaml`` holds a
firing and a quiet unit test for every alert. Dashboard panels, KEDA triggers and the expanded
prometheus-adapter queries go through Prometheus's own parser too, as recording rules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MONITORING = K8S / "components" / "monitoring"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = (
            "promtool missing: run `bash tools/k8s/install-tools.sh` (Debian package prometheus)"
        )
        if os.environ.get("CONVEYOR_ALLOW_SKIP") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return found


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def write_rules(directory: Path, spec: dict[str, Any]) -> None:
    (directory / "alerts.rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(MONITORING / "rules" / "alerts.test.yaml", directory / "alerts.test.yaml")


def rule_spec() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    spec: dict[str, Any] = doc["spec"]
    return spec


def test_rules_check_and_every_alert_unit_test_passes(tmp_path: Path) -> None:
    write_rules(tmp_path, rule_spec())
    checked = run("check", "rules", "alerts.rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    tested = run("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_the_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """A rule that no longer fires when it should fails its unit test (the tests have teeth)."""
    spec = rule_spec()
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "ConveyorOutboxLag":
                rule["expr"] = rule["expr"].replace("> 60", "> 6000")
    write_rules(tmp_path, spec)
    tested = run("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert tested.returncode != 0
    assert "ConveyorOutboxLag" in tested.stdout + tested.stderr


def other_expressions() -> dict[str, str]:
    """Dashboard panels, KEDA triggers and prometheus-adapter queries (templates expanded)."""
    exprs: dict[str, str] = {}
    for path in sorted((MONITORING / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for i, target in enumerate(panel.get("targets", [])):
                expr = target["expr"].replace("$__rate_interval", "5m")
                exprs[f"{path.stem} {panel['title']} {i}"] = expr
    scaled = yaml.safe_load_all(
        (K8S / "components" / "autoscaling-keda" / "scaledobjects.yaml").read_text()
    )
    for so in scaled:
        for trigger in so["spec"]["triggers"]:
            exprs[f"keda {so['metadata']['name']} {trigger['name']}"] = trigger["metadata"]["query"]
    rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-rules.yaml").read_text())[
        "rules"
    ]
    for rule in rules["custom"] + rules["external"]:
        series = re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])
        assert series is not None
        exprs[f"adapter {rule['name']['as']}"] = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series.group(0))
            .replace("<<.LabelMatchers>>", 'namespace="conveyor"')
            .replace("<<.GroupBy>>", "pod")
        )
    return exprs


def test_prometheus_parses_every_other_expression(tmp_path: Path) -> None:
    exprs = other_expressions()
    assert len(exprs) > 40
    rules = [{"record": f"conveyor:check:{i}", "expr": e} for i, e in enumerate(exprs.values())]
    (tmp_path / "exprs.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]})
    )
    checked = run("check", "rules", "exprs.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = [{"record": "conveyor:check:bad", "expr": "sum(rate(conveyor_scheduler_leader[5m])"}]
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "bad", "rules": broken}]})
    )
    assert run("check", "rules", "bad.yaml", cwd=tmp_path).returncode != 0
