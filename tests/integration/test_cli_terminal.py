"""The ``conveyor`` CLI in a real terminal (pexpect): every bad input gives one line on stderr,
a non-zero exit code and never a traceback, including stdout closed early by ``| head -1``."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest

from conveyor_client import AsyncClient
from conveyor_testkit.stack import Stack, start_stack

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

CONVEYOR = Path(sys.executable).parent / "conveyor"


@dataclass(frozen=True)
class Case:
    command: str  # shell text after `conveyor`, {task} = a finished task's id
    exit_code: int
    says: str  # expected in the single stderr line


CASES = {
    "missing_input_file": Case(
        "submit image --model acme/sdxl --input @nofile.json", 2, "nofile.json"
    ),
    "input_not_json": Case("submit image --model acme/sdxl --input '{oops'", 2, "valid JSON"),
    "bad_enum": Case("list --status TASK_STATUS_QUEUED", 2, "invalid choice"),
    "missing_argument": Case("submit image", 2, "--model"),
    "validation_error": Case("submit image --model nope --input '{}'", 1, "spec.model"),
    "not_found": Case(f"get {uuid.uuid4()}", 1, "NOT_FOUND"),
    "bad_token": Case("--token garbage get {task}", 1, "UNAUTHENTICATED"),
    "connection_refused": Case("--address 127.0.0.1:1 --timeout 2 get {task}", 1, "UNAVAILABLE"),
    "admin_without_admin_role": Case("admin tenant get acme", 1, "PERMISSION_DENIED"),
    "missing_secret_file": Case("token --tenant t --secret-file /nonexistent", 2, "/nonexistent"),
}


@pytest.fixture(scope="module")
async def stack(database_url: str) -> AsyncIterator[Stack]:
    s = await start_stack(database_url)
    try:
        yield s
    finally:
        await s.stop()


def _run_in_terminal(shell: str, env: dict[str, str], tmp: Path) -> tuple[int, str, str]:
    """Run ``shell`` under bash in a pty; stdout is the terminal, stderr and the code go to files."""
    err_file = tmp / f"err-{uuid.uuid4().hex}"
    code_file = tmp / f"code-{uuid.uuid4().hex}"
    script = f"{shell} 2>{err_file}; echo ${{PIPESTATUS[0]}} >{code_file}"
    child = pexpect.spawn("bash", ["-c", script], env=env, encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert code_file.exists(), (child.before, child.exitstatus, child.signalstatus)
    return int(code_file.read_text()), child.before or "", err_file.read_text()


async def _finished_task(stack: Stack, token: str) -> str:
    async with AsyncClient(stack.address, token, timeout=5) as c:
        task = (await c.submit("text", model="acme/llm", input={"prompt": "hi"})).task
        await c.cancel(task.task_id)
        await c.wait(task.task_id, timeout=15)
        return task.task_id


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_input_gives_one_line_and_an_exit_code(
    name: str, stack: Stack, tmp_path: Path
) -> None:
    case = CASES[name]
    token = stack.keys.token("term-tenant")
    task_id = await _finished_task(stack, token)
    env = {
        **os.environ,
        "CONVEYOR_ADDRESS": stack.address,
        "CONVEYOR_TOKEN": token,
        "TERM": "xterm",
    }
    env.pop("CONVEYOR_ADMIN_TOKEN", None)
    shell = f"{shlex.quote(str(CONVEYOR))} {case.command.replace('{task}', task_id)}"
    code, _, err = await asyncio.to_thread(_run_in_terminal, shell, env, tmp_path)
    assert code == case.exit_code, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert case.says in lines[0]
    assert "Traceback" not in err


async def test_stdout_closed_early_is_quiet(stack: Stack, tmp_path: Path) -> None:
    token = stack.keys.token("term-pipe")
    task_id = await _finished_task(stack, token)
    env = {**os.environ, "CONVEYOR_ADDRESS": stack.address, "CONVEYOR_TOKEN": token}
    shell = f"{shlex.quote(str(CONVEYOR))} --json watch {task_id} | head -1"
    code, out, err = await asyncio.to_thread(_run_in_terminal, shell, env, tmp_path)
    assert '"sequence": 1' in out  # head printed the first event
    assert "Traceback" not in err
    assert err == ""
    # 141 (like SIGPIPE) when head closed the pipe before the CLI's next write; 3 (the task was
    # canceled) when every event fit in the pipe buffer first.
    assert code in (3, 141)


async def test_admin_commands_use_the_admin_token(stack: Stack, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CONVEYOR_ADDRESS": stack.address,
        "CONVEYOR_TOKEN": stack.keys.token("term-tenant"),
        "CONVEYOR_ADMIN_TOKEN": stack.keys.token("ops", role="admin"),
    }
    shell = f"{shlex.quote(str(CONVEYOR))} admin dead-letters"
    code, out, err = await asyncio.to_thread(_run_in_terminal, shell, env, tmp_path)
    assert code == 0, err
    for column in ("task_id", "tenant", "model", "attempts", "error"):
        assert column in out


async def test_large_output_into_a_closed_pipe_is_quiet(stack: Stack, tmp_path: Path) -> None:
    token = stack.keys.token("term-big", tier="pro")
    async with AsyncClient(stack.address, token, timeout=30) as c:
        prompt = "x" * 1000
        await c.submit_batch(
            [{"kind": "text", "model": "acme/llm", "input": {"prompt": prompt}} for _ in range(200)]
        )
    env = {**os.environ, "CONVEYOR_ADDRESS": stack.address, "CONVEYOR_TOKEN": token}
    # ~300 KB of JSON, far more than a pipe holds: the CLI is still writing when head exits.
    shell = f"{shlex.quote(str(CONVEYOR))} --json list --limit 200 | head -c 100"
    code, out, err = await asyncio.to_thread(_run_in_terminal, shell, env, tmp_path)
    assert out.startswith('[{"task_id"')
    assert err == ""
    # 141 when the CLI was still writing as head exited; 0 when the kernel's pipe took it all
    # (some kernels buffer far more than 64 KiB). Never a traceback, never another code.
    assert code in (0, 141)
