"""Build every service image with whatever container engine answers, stamped from git, and set the
overlays' kustomize ``images:`` to what was built (``make images``, ``make images-set``).

* version: ``git describe --tags --always --dirty`` (a tag such as ``v0.3.1``, else the short commit;
  ``-dirty`` when the work tree has changes), sanitised to a valid image tag; the OCI labels
  ``org.opencontainers.image.version`` and ``.revision`` carry it and the full commit.
* registry: ``CONVEYOR_REGISTRY`` (e.g. ``ghcr.io/acme/conveyor``); images are
  ``<registry>/<service>:<version>``.
* engine: ``CONTAINER_ENGINE`` if set, else the first of docker, podman, buildah whose daemon or
  runtime answers. None answering is not an error: a clear ``skip`` line and exit code 0.
* ``set`` rewrites the ``images:`` entries of ``deploy/k8s/overlays/<overlay>/kustomization.yaml``
  (``newName``/``newTag``; ``kustomize edit set image`` does the same when kustomize is installed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "scheduler", "provider-adapter", "notifier")
ENGINES = ("docker", "podman", "buildah")
PROBES = {
    "docker": ["version", "--format", "{{.Server.Version}}"],
    "podman": ["info", "--format", "{{.Host.Arch}}"],
    "buildah": ["version"],
}
"""A command that fails when the engine cannot build (docker without a daemon, podman without a
runtime)."""


def say(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def run(cmd: Sequence[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=60)


def version(cwd: Path = ROOT) -> tuple[str, str]:
    """(image tag, full commit) from git."""
    described = run(["git", "describe", "--tags", "--always", "--dirty"], cwd)
    commit = run(["git", "rev-parse", "HEAD"], cwd)
    if described.returncode != 0 or commit.returncode != 0:
        raise SystemExit(f"images: not a git checkout ({described.stderr.strip()})")
    tag = re.sub(r"[^A-Za-z0-9_.-]", "-", described.stdout.strip())[:128].lstrip(".-")
    return tag, commit.stdout.strip()


def engine() -> str | None:
    """The first engine that answers (``CONTAINER_ENGINE`` wins), or None."""
    wanted = os.environ.get("CONTAINER_ENGINE")
    for name in [wanted] if wanted else ENGINES:
        path = shutil.which(name)
        if path is None:
            continue
        probe = PROBES.get(Path(name).name, ["version"])
        try:
            if run([path, *probe]).returncode == 0:
                return path
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def registry() -> str:
    value = os.environ.get("CONVEYOR_REGISTRY", "").strip().rstrip("/")
    if not value:
        raise SystemExit(
            "images: set CONVEYOR_REGISTRY to the registry and path of the images "
            "(e.g. CONVEYOR_REGISTRY=ghcr.io/acme/conveyor make images)"
        )
    if not re.fullmatch(r"[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*", value):
        raise SystemExit(f"images: CONVEYOR_REGISTRY={value!r} is not a registry/path")
    return value


def build_commands(
    tool: str, reg: str, tag: str, commit: str, services: Sequence[str] = SERVICES
) -> list[list[str]]:
    build = ["bud"] if Path(tool).name == "buildah" else ["build"]
    return [
        [
            tool,
            *build,
            "-f",
            f"services/{svc}/Dockerfile",
            "-t",
            f"{reg}/{svc}:{tag}",
            "--label",
            f"org.opencontainers.image.version={tag}",
            "--label",
            f"org.opencontainers.image.revision={commit}",
            "--label",
            "org.opencontainers.image.source=conveyor",
            ".",
        ]
        for svc in services
    ]


def set_images(kustomization: Path, reg: str, tag: str) -> None:
    """Point the overlay's ``images:`` entries at ``<reg>/<service>:<tag>``."""
    text = kustomization.read_text()
    for svc in SERVICES:
        pattern = re.compile(
            rf"(- name: conveyor-{re.escape(svc)}\n(\s+)newName: )\S+(\n\s+newTag: )\S+"
        )
        text, n = pattern.subn(rf"\g<1>{reg}/{svc}\g<3>{tag}", text)
        if n != 1:
            raise SystemExit(f"images: {kustomization}: no images entry for conveyor-{svc}")
    kustomization.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (and with --push, push) every service image")
    b.add_argument("--push", action="store_true")
    s = sub.add_parser("set", help="set an overlay's images: to the registry and the git version")
    s.add_argument("--overlay", default="prod", choices=("dev", "prod"))
    s.add_argument("--tag", help="image tag (default: from git describe)")
    sub.add_parser("version", help="print the version stamped on the images")
    args = parser.parse_args(argv)
    if args.command == "version":
        say(version()[0])
        return 0
    if args.command == "set":
        reg = registry()
        tag = args.tag or version()[0]
        target = ROOT / "deploy" / "k8s" / "overlays" / args.overlay / "kustomization.yaml"
        set_images(target, reg, tag)
        say(f"images: {target.relative_to(ROOT)} -> {reg}/<service>:{tag}")
        return 0
    tool = engine()
    if tool is None:
        say(
            "images: skip: no container engine answers (tried "
            f"{os.environ.get('CONTAINER_ENGINE') or ', '.join(ENGINES)}); install or start "
            "docker, podman or buildah, or set CONTAINER_ENGINE"
        )
        return 0
    reg = registry()
    tag, commit = version()
    for cmd in build_commands(tool, reg, tag, commit):
        say("images: " + " ".join(cmd[:1] + cmd[1:6]))
        if subprocess.run(cmd, cwd=ROOT, check=False).returncode != 0:
            return 1
        if args.push:
            image = cmd[cmd.index("-t") + 1]
            push = [tool, "push", image]
            if subprocess.run(push, cwd=ROOT, check=False).returncode != 0:
                return 1
    say(f"images: built {len(SERVICES)} images {reg}/<service>:{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
