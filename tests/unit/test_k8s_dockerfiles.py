"""Static checks of the service Dockerfiles (there is no Docker engine here to build them).

Multi-stage, a base pinned by tag and digest (the same in every image), no ``latest``, a locked
``uv sync`` of exactly the service's workspace member, a numeric non-root USER matching the pods'
``runAsUser``, the entry point the Deployment runs, the ports it exposes, and a ``.dockerignore``
that keeps the context to what the images need. tests/integration/test_k8s_image_install.py runs
the install steps themselves.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {
    "gateway": "conveyor_gateway",
    "scheduler": "conveyor_scheduler",
    "provider-adapter": "conveyor_provider_adapter",
    "notifier": "conveyor_notifier",
}
BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}$")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_dockerfile_is_multistage_pinned_and_non_root(service: str) -> None:
    text = (ROOT / "services" / service / "Dockerfile").read_text()
    steps = instructions(text)
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    assert BASE.match(args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    froms = [a for w, a in steps if w == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms), froms
    assert "latest" not in text
    # the last stage: a numeric non-root user, the venv copied from the build stage, no build tools
    last = max(i for i, (w, _) in enumerate(steps) if w == "FROM")
    final = steps[last:]
    users = [a for w, a in final if w == "USER"]
    assert users == ["10001:10001"]
    assert any(w == "COPY" and a.startswith("--from=build") and "/app/.venv" in a for w, a in final)
    assert not any(w == "RUN" and ("uv " in a or "pip " in a) for w, a in final)
    (entry,) = [a for w, a in final if w == "ENTRYPOINT"]
    assert entry == f'["python", "-m", "{SERVICES[service]}"]'


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_dockerfile_installs_the_locked_member(service: str) -> None:
    text = (ROOT / "services" / service / "Dockerfile").read_text()
    member = tomllib.loads((ROOT / "services" / service / "pyproject.toml").read_text())["project"][
        "name"
    ]
    runs = [a for w, a in instructions(text) if w == "RUN" and "uv sync" in a]
    assert len(runs) == 2, "dependencies layer, then the workspace packages"
    for run in runs:
        assert "--frozen" in run
        assert "--no-dev" in run
        assert f"--package {member}" in run
    assert "--no-install-workspace" in runs[0]
    assert "--no-editable" in runs[1]
    uv_version = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert uv_version is not None
    assert f"ARG UV_VERSION={uv_version.group(1)}" in text, "the uv the Makefile pins"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_dockerfile_exposes_the_deployment_ports(service: str) -> None:
    text = (ROOT / "services" / service / "Dockerfile").read_text()
    exposed = {int(p) for w, a in instructions(text) if w == "EXPOSE" for p in a.split()}
    deployment = yaml.safe_load(
        (ROOT / "deploy" / "k8s" / "base" / service / "deployment.yaml").read_text()
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert exposed == {p["containerPort"] for p in container["ports"]}
    assert container["securityContext"]["runAsUser"] == 10001


def test_every_image_uses_the_same_base() -> None:
    bases = {
        re.search(
            r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "services" / s / "Dockerfile").read_text(), re.M
        ).group(1)  # type: ignore[union-attr]
        for s in SERVICES
    }
    assert len(bases) == 1, bases


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**", "allow-list: exclude everything, then re-include"
    included = {line[1:] for line in lines if line.startswith("!")}
    assert included == {"pyproject.toml", "uv.lock", "libs/**", "services/**"}
    assert "**/tests/**" in lines
    assert "**/__pycache__" in lines
