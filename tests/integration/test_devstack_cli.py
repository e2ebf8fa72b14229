"""``python -m conveyor_devstack up --detach`` / ``down``, and no orphan when its owner is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def devstack_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CONVEYOR_TEST_DATABASE_URL", "CONVEYOR_TEST_KAFKA_BOOTSTRAP")
    }
    env["CONVEYOR_DEVSTACK_BACKEND"] = "local"
    return subprocess.run(
        [sys.executable, "-m", "conveyor_devstack", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def up_detached(state: Path) -> dict[str, object]:
    up = devstack_cli("up", "--detach", "--no-kafka", "--fast", "--state-file", str(state))
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith(
        "export CONVEYOR_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:"
    )
    info: dict[str, object] = json.loads(state.read_text())
    postgres = info["postgres"]
    assert isinstance(postgres, dict)
    assert postgres["backend"] == "local-process"
    assert str(postgres["version"]).startswith("15.")
    return info


def test_up_detach_then_down_stops_everything(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    info = up_detached(state)
    daemon = int(str(info["pid"]))
    (postmaster,) = children(daemon)
    with psycopg.connect(str(info["database_url"])) as conn:
        assert conn.execute("select current_database()").fetchone() == ("conveyor",)

    status = devstack_cli("status", "--state-file", str(state), "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["database_url"] == info["database_url"]

    down = devstack_cli("down", "--state-file", str(state))
    assert down.returncode == 0, down.stderr
    assert wait_gone(daemon)
    assert wait_gone(postmaster)
    assert not state.exists()
    assert devstack_cli("status", "--state-file", str(state)).returncode == 1


def test_a_killed_owner_takes_its_servers_with_it(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    info = up_detached(state)
    daemon = int(str(info["pid"]))
    (postmaster,) = children(daemon)

    os.kill(daemon, signal.SIGKILL)  # no atexit, no signal handler runs

    assert wait_gone(daemon)
    assert wait_gone(postmaster), "postgres outlived its SIGKILLed owner"
    down = devstack_cli("down", "--state-file", str(state))
    assert down.returncode == 0
    assert not state.exists()
