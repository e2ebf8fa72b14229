"""The ``conveyor`` CLI (conveyor_client.cli) against a running gateway and real scheduler: end to end,
submit --wait, admin commands, the token helper, help as a subprocess, groups.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import jwt
import pytest

from conveyor_client import (
    AsyncConveyorClient,
    ConveyorError,
)
from conveyor_testkit.stack import Stack
from tests.integration.client_env import (
    cli,
    stack_fixture,  # noqa: F401 (fixtures)
)

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


async def test_cli_end_to_end(
    stack: Stack,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    token = stack.keys.token("cli-tenant")
    monkeypatch.setenv("CONVEYOR_ADDRESS", stack.address)
    monkeypatch.setenv("CONVEYOR_TOKEN", token)
    doc = tmp_path / "input.json"
    doc.write_text(json.dumps({"prompt": "from a file"}))

    code, out, _ = await cli(
        capsys, "submit", "image", "--model", "acme/sdxl", "--input", f"@{doc}",
        "--priority", "urgent", "--label", "team=ml", "--json",
    )  # fmt: skip
    assert code == 0
    submitted = json.loads(out)
    task_id = submitted["task"]["task_id"]
    assert submitted["task"]["input"] == {"prompt": "from a file"}
    assert submitted["task"]["labels"] == {"team": "ml"}
    assert submitted["task"]["priority"] == "urgent"  # the spelling --priority takes

    code, out, _ = await cli(capsys, "get", task_id, "--json")
    assert code == 0
    assert json.loads(out)["task_id"] == task_id

    code, out, _ = await cli(capsys, "get", task_id)  # human output
    assert code == 0
    assert task_id in out

    code, out, _ = await cli(capsys, "list", "--json", "--kind", "image")
    assert [t["task_id"] for t in json.loads(out)] == [task_id]

    code, out, _ = await cli(capsys, "cancel", task_id, "--reason", "test", "--json")
    assert code == 0

    code, out, _ = await cli(capsys, "watch", task_id, "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["type"] == "submitted"
    assert lines[-1]["type"] == "canceled"
    assert [line["sequence"] for line in lines] == list(range(1, len(lines) + 1))  # numbers
    assert lines[-1]["task"]["status"] == "canceled"
    assert code == 3  # the task ended, but not successfully

    code, out, _ = await cli(capsys, "watch", task_id)  # progress bar, then the final task
    assert code == 3
    assert "canceled" in out

    code, out, _ = await cli(capsys, "list", "--json", "--status", "canceled")
    assert [t["status"] for t in json.loads(out)] == ["canceled"]

    code, out, _ = await cli(capsys, "stats")
    assert code == 0
    assert "image" in out

    code, _, err = await cli(capsys, "submit", "image", "--model", "bad", "--input", "{}")
    assert code == 1
    assert "INVALID_ARGUMENT" in err
    assert "spec.model" in err
    assert len(err.splitlines()) == 1
    assert err.count("spec.model") == 1  # printed once

    code, _, err = await cli(capsys, "submit", "image", "--model", "a/b", "--input", "[1]")
    assert code == 2
    assert "JSON object" in err

    code, _, err = await cli(capsys, "--token", "garbage", "get", task_id)
    assert code == 1
    assert "UNAUTHENTICATED" in err


async def test_cli_submit_wait(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    token = stack.keys.token("cli-wait")
    args = ["--address", stack.address, "--token", token]

    async def cancel_soon() -> None:
        async with AsyncConveyorClient(stack.address, token) as c:
            for _ in range(100):
                pages = [p async for p in c.list()]
                if pages[0]:
                    await c.cancel(pages[0][0].task_id)
                    return
                await asyncio.sleep(0.05)

    canceller = asyncio.create_task(cancel_soon())
    code, out, _ = await cli(
        capsys, *args, "submit", "text", "--model", "acme/llm", "--wait", "--json"
    )
    await canceller
    assert code == 3
    assert json.loads(out)["status"] == "canceled"


async def test_cli_admin_commands(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--address", stack.address, "--token", stack.keys.token("ops", role="admin")]
    code, out, _ = await cli(
        capsys,
        *args,
        "admin",
        "tenant",
        "set",
        "cli-t",
        "--tier",
        "pro",
        "--max-concurrency",
        "4",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["tier"] == "pro"
    code, out, _ = await cli(capsys, *args, "admin", "tenant", "get", "cli-t", "--json")
    assert json.loads(out)["limits"]["max_concurrency"] == 4
    code, out, _ = await cli(capsys, *args, "admin", "tenant", "get", "cli-t")  # text, not JSON
    assert code == 0
    assert out.startswith("tenant cli-t  tier pro")
    assert "max_concurrency" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    # A model no task used is refused (a typo pauses nothing), in one line, unless asked for.
    code, out, err = await cli(capsys, *args, "admin", "pause", "nosuch/model")
    assert code != 0
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "not found" in err
    assert "allow-unknown" in err or "allow_unknown" in err
    code, out, _ = await cli(
        capsys, *args, "admin", "pause", "acme/later", "--reason", "x", "--allow-unknown"
    )
    assert code == 0
    assert "paused" in out
    code, out, _ = await cli(capsys, *args, "admin", "pause-tenant", "cli-t", "--reason", "audit")
    assert code == 0
    code, out, _ = await cli(capsys, *args, "admin", "paused", "--json")
    listed = {(e["kind"], e["name"]): e for e in json.loads(out)}
    assert listed[("model", "acme/later")]["reason"] == "x"
    assert listed[("tenant", "cli-t")]["reason"] == "audit"
    code, out, _ = await cli(capsys, *args, "admin", "paused")  # a table, not JSON
    assert code == 0
    assert "acme/later" in out
    assert "cli-t" in out
    code, out, _ = await cli(capsys, *args, "admin", "resume-tenant", "cli-t", "--json")
    assert json.loads(out) == {"tenant_id": "cli-t", "paused": False}
    code, out, _ = await cli(capsys, *args, "admin", "resume", "acme/later", "--json")
    assert json.loads(out) == {"model": "acme/later", "paused": False}
    tenant_args = ["--address", stack.address, "--token", stack.keys.token("cli-t")]
    code, out, err = await cli(capsys, *tenant_args, "admin", "paused")
    assert code != 0
    assert "PERMISSION_DENIED" in err or "permission" in err.lower()
    code, out, _ = await cli(capsys, *args, "admin", "dead-letters", "--json")
    assert code == 0
    code, out, _ = await cli(
        capsys, *args, "admin", "bulk-cancel", "--tenant", "nobody-here", "--json"
    )
    assert json.loads(out) == {"task_ids": []}
    code, out, _ = await cli(capsys, *args, "admin", "redrive", "--tenant", "nobody-here", "--json")
    assert json.loads(out) == {"task_ids": []}


async def test_cli_token_helper(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "s" * 40
    code, out, _ = await cli(
        capsys, "token", "--secret", secret, "--tenant", "dev", "--role", "admin", "--tier", "pro"
    )
    assert code == 0
    claims = jwt.decode(out.strip(), secret, algorithms=["HS256"], audience="conveyor-gateway")
    assert claims["tenant_id"] == "dev"
    assert claims["role"] == "admin"
    assert claims["iss"] == "conveyor"


def test_cli_help_as_a_subprocess() -> None:
    script = Path(sys.executable).parent / "conveyor"
    for args in ([], ["submit"], ["admin", "tenant", "set"]):
        done = subprocess.run(
            [str(script), *args, "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert "usage: conveyor" in done.stdout
    assert (
        "--deployment"
        in subprocess.run(
            [str(script), "submit", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )


async def test_group_sdk_and_cli(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    token = stack.keys.token(f"grp-{uuid.uuid4().hex[:8]}")
    base = ["--address", stack.address, "--token", token]
    code, out, _ = await cli(
        capsys, *base, "group", "submit", "image", "--model", "acme/sdxl",
        "--inputs", json.dumps([{"prompt": f"shot {i}"} for i in range(3)]),
        "--follow-up-model", "acme/video", "--outputs-field", "frames", "--json",
    )  # fmt: skip
    assert code == 0
    group = json.loads(out)
    group_id = group["group_id"]
    assert len(group["child_task_ids"]) == 3
    assert group["progress"]["total"] == 3
    assert group["has_follow_up"] is True

    async with AsyncConveyorClient(stack.address, token, timeout=5) as client:
        got = await client.get_group(group_id)
        assert list(got.child_task_ids) == group["child_task_ids"]
        child = await client.get(got.child_task_ids[0])
        assert child.group_id == group_id
        listed = await client.list_groups()
        assert [g.group_id for g in listed.groups] == [group_id]
        with pytest.raises(ConveyorError) as missing:
            await client.get_group(str(uuid.uuid4()))
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ConveyorError) as bad:
            await client.submit_group([])
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT

        code, out, _ = await cli(capsys, *base, "group", "cancel", group_id, "--reason", "t")
        assert code == 0
        assert "canceled" in out

        events = [e async for e in client.watch_group(group_id)]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[-1].group.status == 5  # GROUP_STATUS_CANCELED
        tail = [e async for e in client.watch_group(group_id, after_sequence=2)]
        assert tail == events[2:]

    code, out, _ = await cli(capsys, *base, "group", "watch", group_id, "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["type"] == "GROUP_EVENT_TYPE_CREATED"
    assert lines[-1]["type"] == "GROUP_EVENT_TYPE_COMPLETED"
    assert code == 3  # the group ended, but not successfully
    code, out, _ = await cli(capsys, *base, "group", "watch", group_id)  # the bars, then the group
    assert code == 3
    assert "canceled" in out
    code, out, _ = await cli(capsys, *base, "group", "get", group_id)
    assert code == 0
    assert "0 succeeded" in out
