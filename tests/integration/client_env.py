"""Fixtures of the client tests: a real scheduler behind a real gateway (``stack``), an SDK client on it
(``client``; import the ``*_fixture`` names), and the CLI run in-process (:func:`cli`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor_client import (
    AsyncConveyorClient,
)
from conveyor_client.cli import main
from conveyor_testkit.stack import Stack, start_stack

E = task_pb2


@pytest.fixture(scope="module", name="stack")
async def stack_fixture(database_url: str) -> AsyncIterator[Stack]:
    # 127.0.0.2 stands in for a public callback host (allow-listed for this module only, at the
    # gateway and at the scheduler's registration check).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCHEDULER_WEBHOOK_ALLOW_HOSTS", "127.0.0.2")
        s = await start_stack(database_url, gateway={"url_allowed_hosts": ["127.0.0.2/32"]})
        try:
            yield s
        finally:
            await s.stop()


@pytest.fixture(name="client")
async def client_fixture(stack: Stack) -> AsyncIterator[AsyncConveyorClient]:
    async with AsyncConveyorClient(
        stack.address, stack.keys.token(f"sdk-{uuid.uuid4().hex[:8]}"), timeout=5
    ) as c:
        yield c


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err
