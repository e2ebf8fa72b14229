"""`make setup` on a fresh clone prints nothing on stdout (``eval "$(make -s up)"`` must only see
export lines) and leaves the work tree clean (``npm ci`` never rewrites package-lock.json)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def test_make_setup_on_a_fresh_clone_is_quiet_and_clean(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)],
        check=True,
        timeout=120,
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MAKEFLAGS", "MAKELEVEL")
    }
    done = subprocess.run(
        ["make", "-s", "setup"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True
    )
    assert status.stdout == ""
    assert (clone / "tools/buf/node_modules/.bin/buf").exists()
