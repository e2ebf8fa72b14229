"""The code's shape, as docs/architecture.md states it: small modules, and a map that stays true."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 500
GENERATED = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")


def hand_written_modules() -> list[Path]:
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / p for p in tracked if not p.endswith(GENERATED) and "/migrations/" not in p]


def test_no_hand_written_module_is_over_500_lines() -> None:
    modules = hand_written_modules()
    assert len(modules) > 100  # the listing works
    too_long = {
        str(p.relative_to(ROOT)): n
        for p in modules
        if p.exists() and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert too_long == {}


@pytest.mark.parametrize("package", ["conveyor_scheduler"])
def test_the_map_names_every_scheduler_module(package: str) -> None:
    text = (ROOT / "docs/architecture.md").read_text()
    src = ROOT / "services/scheduler/src" / package
    missing = [
        str(p.relative_to(src))
        for p in src.rglob("*.py")
        if p.name != "__init__.py"
        and p.parent != src  # top-level modules are named in the wiring row or by concept
        and p.parent.name not in ("groups", "client_webhooks")  # documented as packages
        and str(p.relative_to(src)) not in text
    ]
    assert missing == []


PRODUCTION = {
    "conveyor_common": ROOT / "libs/conveyor-common/src/conveyor_common",
    "conveyor_protos": ROOT / "libs/conveyor-protos/src/conveyor",
    "conveyor_client": ROOT / "libs/conveyor-client/src/conveyor_client",
    "conveyor_gateway": ROOT / "services/gateway/src/conveyor_gateway",
    "conveyor_scheduler": ROOT / "services/scheduler/src/conveyor_scheduler",
    "conveyor_provider_adapter": ROOT / "services/provider-adapter/src/conveyor_provider_adapter",
    "conveyor_notifier": ROOT / "services/notifier/src/conveyor_notifier",
}
SERVICES = {
    "conveyor_gateway",
    "conveyor_scheduler",
    "conveyor_provider_adapter",
    "conveyor_notifier",
}
NOT_PRODUCTION = {"conveyor_devstack", "fake_replicate", "conveyor_testkit", "tests", "bench"}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def boundary_violations(package: str, src: Path) -> list[str]:
    forbidden = NOT_PRODUCTION | (SERVICES - {package})
    found: list[str] = []
    for path in src.rglob("*.py"):
        if path.name.endswith(GENERATED):
            continue
        name = path.relative_to(src)
        found.extend(f"{name} imports {i}" for i in sorted(imported_packages(path) & forbidden))
    return found


@pytest.mark.parametrize("package", sorted(PRODUCTION))
def test_no_production_package_imports_another_service_the_devstack_or_the_fake(
    package: str,
) -> None:
    assert boundary_violations(package, PRODUCTION[package]) == []


def test_the_boundary_check_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "mod.py"
    bad.write_text("from conveyor_scheduler.store import db\nimport fake_replicate\n")
    assert imported_packages(bad) == {"conveyor_scheduler", "fake_replicate"}
    assert boundary_violations("conveyor_gateway", tmp_path) == [
        "mod.py imports conveyor_scheduler",
        "mod.py imports fake_replicate",
    ]
