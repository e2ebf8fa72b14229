"""Services run on uvloop unless ``*_EVENT_LOOP=asyncio`` (conveyor_common.service.run_service)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from pydantic import ValidationError

from conveyor_common.service import run_service
from conveyor_common.settings import ServiceSettings


async def loop_class() -> type[asyncio.AbstractEventLoop]:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_services_run_on_uvloop_by_default() -> None:
    assert run_service(loop_class(), ServiceSettings()) is uvloop.Loop


def test_the_standard_loop_can_be_chosen() -> None:
    cls = run_service(loop_class(), ServiceSettings(event_loop="asyncio"))
    assert cls is not uvloop.Loop
    assert issubclass(cls, asyncio.BaseEventLoop)


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValidationError, match="event_loop"):
        ServiceSettings(event_loop="trio")  # type: ignore[arg-type]
