"""The Dockerfiles' install steps, run for real without Docker.

Each Dockerfile's build stage copies ``pyproject.toml`` and ``uv.lock``, runs a first ``uv sync``
(third-party dependencies only), copies ``libs/`` and ``services/`` and runs a second one (the
workspace packages as wheels). This test replays exactly those ``RUN uv sync`` lines, read from the
Dockerfile, in a scratch build context and a fresh environment, then checks that the runtime image's
environment alone (no source tree) imports the service and, for the scheduler, finds its migrations.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {
    "gateway": "conveyor_gateway",
    "scheduler": "conveyor_scheduler",
    "provider-adapter": "conveyor_provider_adapter",
    "notifier": "conveyor_notifier",
}
IGNORE = shutil.ignore_patterns(
    "__pycache__", "*.pyc", "tests", ".mypy_cache", ".pytest_cache", "node_modules", "*.egg-info"
)


def uv() -> str:
    found = shutil.which("uv")
    if found is None:
        pytest.fail("uv not found on PATH (make setup installs it)")
    return found


def sync_commands(dockerfile: Path) -> list[list[str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [m.split() for m in re.findall(r"^RUN (uv sync .+)$", text, flags=re.M)]


def base_python() -> str:
    """The interpreter the venv was made from (the image's /usr/local/bin/python3.11)."""
    return str(
        Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    )


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_image_environment_installs_from_the_lockfile_and_runs(
    service: str, tmp_path: Path
) -> None:
    context = tmp_path / "src"
    context.mkdir()
    env_dir = tmp_path / "app" / ".venv"
    env = {
        **os.environ,
        "UV_PROJECT_ENVIRONMENT": str(env_dir),
        "UV_PYTHON": base_python(),
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_COMPILE_BYTECODE": "0",
        "VIRTUAL_ENV": "",
    }
    first, second = sync_commands(ROOT / "services" / service / "Dockerfile")
    # COPY pyproject.toml uv.lock ./  then the dependency layer
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(ROOT / name, context / name)
    done = subprocess.run(first, cwd=context, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # COPY libs libs; COPY services services; then the workspace packages (not editable)
    shutil.copytree(ROOT / "libs", context / "libs", ignore=IGNORE)
    shutil.copytree(ROOT / "services", context / "services", ignore=IGNORE)
    done = subprocess.run(second, cwd=context, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # The runtime stage has only /app/.venv: remove the build context and import from elsewhere.
    shutil.rmtree(context)
    module = SERVICES[service]
    probe = f"import {module}.__main__, {module}.settings; print({module}.__file__)"
    if service == "scheduler":
        probe += "; from conveyor_scheduler.store.db import alembic_ini_path, head_revisions; print(alembic_ini_path(), head_revisions())"
    ran = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", probe],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert str(env_dir) in ran.stdout, "imported from the image's environment, not the source tree"
    dev_tools = [
        p.name for p in (env_dir / "bin").iterdir() if p.name in ("pytest", "mypy", "ruff")
    ]
    assert dev_tools == [], "--no-dev keeps the dev group out of the image"
