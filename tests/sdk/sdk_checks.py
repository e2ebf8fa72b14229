"""SDK checks run by ``tests/integration/test_sdk_matrix.py`` inside fresh virtual environments.

Only the installed wheels are importable here (no workspace, no pytest): plain assertions, one
function per check, against the stack named by CONVEYOR_ADDRESS / CONVEYOR_TOKEN (a pro-tier tenant).
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from conveyor_client import (
    AsyncClient,
    Client,
    ConveyorError,
    EventType,
    Priority,
    TaskKind,
    TaskStatus,
    spec,
)


def check_core_needs_no_cli_extra() -> None:
    assert "rich" not in sys.modules
    assert "jwt" not in sys.modules


def check_typed_sync_flow() -> None:
    with Client.from_env(timeout=10) as c:
        sub = c.submit("image", model="acme/sdxl", input={"prompt": "matrix"}, priority="low")
        assert sub.task.kind is TaskKind.IMAGE
        assert sub.task.priority is Priority.LOW
        assert sub.task.to_dict()["priority"] == "low"
        again = c.submit(
            "image",
            model="acme/sdxl",
            input={"prompt": "matrix"},
            priority="low",
            request_id=sub.task.request_id,
        )
        assert again.deduplicated
        assert again.task.task_id == sub.task.task_id
        c.cancel(sub.task.task_id)
        final = c.wait(sub.task.task_id, timeout=30)
        assert final.status is TaskStatus.CANCELED, final.status
        try:
            c.get("00000000-0000-4000-8000-000000000000")
        except ConveyorError as exc:
            assert exc.code == grpc.StatusCode.NOT_FOUND  # noqa: PT017 - no pytest here
        else:
            raise AssertionError("NOT_FOUND expected")


def check_batch_split() -> None:
    with Client.from_env(timeout=30) as c:
        items = [spec("text", model="acme/llm", input={"prompt": str(i)}) for i in range(130)]
        batch = c.submit_batch(items)
        assert len(batch.tasks) == 130
        assert len({t.task_id for t in batch.tasks}) == 130


async def _watch_many() -> None:
    async with AsyncClient.from_env(timeout=10) as c:
        batch = await c.submit_batch(
            [{"kind": "audio", "model": "acme/tts", "input": {"text": str(i)}} for i in range(2)]
        )
        ids = [t.task_id for t in batch.tasks]
        for task_id in ids:
            await c.cancel(task_id)
        ended = {e.task_id async for e in c.watch_many(ids, timeout=30) if e.type.terminal}
        assert ended == set(ids)
        last = [e async for e in c.watch(ids[0])][-1]
        assert last.type is EventType.CANCELED


def check_async_watch_many() -> None:
    asyncio.run(_watch_many())


def main() -> int:
    checks = [v for k, v in sorted(globals().items()) if k.startswith("check_") and callable(v)]
    for check in checks:
        check()
        print(f"ok {check.__name__} (Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
