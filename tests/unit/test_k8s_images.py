"""``make images``: the engine that answers builds, none answering is a clean skip, the version is
stamped from git, and the overlays' ``images:`` follow the registry and version."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "k8s" / "images.py"
sys.path.insert(0, str(SCRIPT.parent))
import images  # type: ignore[import-not-found]  # noqa: E402


def fake_engine(bin_dir: Path, name: str, answers: bool, log: Path) -> None:
    """An engine on PATH that logs its arguments; its probe fails unless ``answers``."""
    script = bin_dir / name
    probe_rc = 0 if answers else 1
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'case "$1" in version|info) '
        f"exit {probe_rc};; esac\n"
        "exit 0\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def run_script(*args: str, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
        cwd=ROOT,
    )


def base_path(tmp: Path) -> str:
    """Only git (and sh) from the system: no real engine can answer."""
    tools = tmp / "sys"
    tools.mkdir()
    for tool in ("git", "sh"):
        found = shutil.which(tool)
        assert found is not None
        (tools / tool).symlink_to(found)
    return str(tools)


def test_no_engine_answering_is_a_clear_skip(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    fake_engine(bin_dir, "docker", answers=False, log=log)  # a client without a daemon
    proc = run_script("build", path=f"{bin_dir}:{base_path(tmp_path)}")
    assert proc.returncode == 0, proc.stderr
    assert "images: skip: no container engine answers" in proc.stdout
    assert log.read_text().split()[0] == "version", "probed, never asked to build"
    assert "build" not in log.read_text()


def test_the_engine_that_answers_builds_every_service_stamped_from_git(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    fake_engine(bin_dir, "docker", answers=False, log=log)
    fake_engine(bin_dir, "podman", answers=True, log=log)
    proc = run_script(
        "build", path=f"{bin_dir}:{base_path(tmp_path)}", CONVEYOR_REGISTRY="ghcr.io/acme/conveyor"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tag, commit = images.version()
    builds = [line.split() for line in log.read_text().splitlines() if line.startswith("build")]
    assert [b[b.index("-t") + 1] for b in builds] == [
        f"ghcr.io/acme/conveyor/{svc}:{tag}" for svc in images.SERVICES
    ]
    for b in builds:
        assert f"org.opencontainers.image.version={tag}" in b
        assert f"org.opencontainers.image.revision={commit}" in b
        assert b[-1] == "."


def test_an_engine_needs_a_registry(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_engine(bin_dir, "buildah", answers=True, log=tmp_path / "log")
    proc = run_script("build", path=f"{bin_dir}:{base_path(tmp_path)}")
    assert proc.returncode != 0
    assert "CONVEYOR_REGISTRY" in proc.stdout + proc.stderr
    cmds = images.build_commands(str(bin_dir / "buildah"), "r.example/c", "v1", "abc")
    assert all(c[1] == "bud" for c in cmds)


def test_version_comes_from_git_describe(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@e", *args],
            cwd=repo,
            check=True,
            capture_output=True,
        )

    git("init", "-q")
    (repo / "f").write_text("1")
    git("add", "f")
    git("commit", "-qm", "one")
    short, commit = images.version(repo)
    assert commit.startswith(short)
    assert len(commit) == 40
    git("tag", "v1.2.3")
    assert images.version(repo)[0] == "v1.2.3"
    (repo / "f").write_text("2")
    assert images.version(repo)[0] == "v1.2.3-dirty"
    git("commit", "-qam", "two")
    tag = images.version(repo)[0]
    assert tag.startswith("v1.2.3-1-g")
    assert all(c.isalnum() or c in "_.-" for c in tag)


def test_set_writes_the_overlay_images_block(tmp_path: Path) -> None:
    overlay = tmp_path / "kustomization.yaml"
    shutil.copy(ROOT / "deploy" / "k8s" / "overlays" / "prod" / "kustomization.yaml", overlay)
    images.set_images(overlay, "ghcr.io/acme/conveyor", "v2.0.0")
    doc = yaml.safe_load(overlay.read_text())
    assert {i["name"]: (i["newName"], i["newTag"]) for i in doc["images"]} == {
        f"conveyor-{svc}": (f"ghcr.io/acme/conveyor/{svc}", "v2.0.0") for svc in images.SERVICES
    }
    before = (ROOT / "deploy" / "k8s" / "overlays" / "prod" / "kustomization.yaml").read_text()
    assert overlay.read_text().count("\n") == before.count("\n"), "comments and layout kept"


@pytest.mark.parametrize("value", ["", "Registry.Example/x", "https://r.example/x"])
def test_bad_registries_are_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_REGISTRY", value)
    with pytest.raises(SystemExit):
        images.registry()
