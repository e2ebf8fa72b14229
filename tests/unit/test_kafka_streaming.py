"""KeyedStream (conveyor_common.kafka.streaming): records of one key in order, keys side by side,
the committable prefix per partition, and the rewind after a failure."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from conveyor_common.kafka.streaming import KeyedStream

TP = ("topic", 0)


def records(*spec: tuple[int, str]) -> list[Any]:
    return [SimpleNamespace(offset=offset, key=key.encode()) for offset, key in spec]


class Recorder:
    def __init__(self) -> None:
        self.gates: dict[int, asyncio.Event] = {}
        self.started: list[int] = []
        self.finished: list[int] = []
        self.failing: set[int] = set()
        self.prefixes: list[int] = []

    def gate(self, offset: int) -> asyncio.Event:
        return self.gates.setdefault(offset, asyncio.Event())

    async def handle(self, record: Any) -> None:
        self.started.append(record.offset)
        if record.offset in self.gates:
            await self.gates[record.offset].wait()
        if record.offset in self.failing:
            raise ConnectionError("dead-letter topic unreachable")
        self.finished.append(record.offset)

    def on_prefix(self, tp: Any, next_offset: int) -> None:
        assert tp == TP
        self.prefixes.append(next_offset)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_slow_record_holds_its_key_and_the_prefix_only() -> None:
    rec = Recorder()
    stream = KeyedStream(8, rec.handle, rec.on_prefix)
    rec.gate(0)
    stream.add(TP, records((0, "a"), (1, "b"), (2, "a"), (3, "c")))
    await settle()
    assert rec.finished == [1, 3]  # other keys ran past the slow record
    assert 2 not in rec.started  # its key's next record waits for it
    assert rec.prefixes == []  # nothing committable while offset 0 is in hand
    rec.gates[0].set()
    assert await stream.drain(within_s=1)
    assert rec.finished == [1, 3, 0, 2]
    assert rec.prefixes[-1] == 4
    assert stream.in_hand == 0


async def test_room_opens_by_half_the_limit() -> None:
    rec = Recorder()
    stream = KeyedStream(8, rec.handle, rec.on_prefix)
    for offset in range(8):
        rec.gate(offset)
    stream.add(TP, records(*((i, f"k{i}") for i in range(8))))
    waiting = asyncio.create_task(stream.wait_room())
    for offset in range(3):
        rec.gates[offset].set()
    await settle()
    assert not waiting.done()  # three free slots of eight: not yet
    rec.gates[3].set()
    await settle()
    assert waiting.done()  # four free: half
    for gate in rec.gates.values():
        gate.set()
    assert await stream.drain(within_s=1)


async def test_a_failure_skips_its_keys_later_records_and_rewinds_to_it() -> None:
    rec = Recorder()
    rec.failing = {1}
    stream = KeyedStream(8, rec.handle, rec.on_prefix)
    rec.gate(1)
    stream.add(TP, records((0, "a"), (1, "b"), (2, "b"), (3, "c")))
    await settle()
    rec.gates[1].set()
    await settle()
    failure = stream.failure
    assert isinstance(failure, ConnectionError)
    assert await stream.drain(within_s=1)
    assert 2 not in rec.started  # never run ahead of the failed record of its key
    assert stream.rewind_points() == {TP: 1}
    assert rec.prefixes[-1] == 1  # offset 0 handled; 1 is where reading resumes
    stream.reset()
    assert stream.failure is None
    assert stream.rewind_points() == {}


async def test_close_releases_a_waiter_and_cancel_stops_what_is_in_hand() -> None:
    rec = Recorder()
    stream = KeyedStream(1, rec.handle, rec.on_prefix)
    rec.gate(0)
    stream.add(TP, records((0, "a"), (1, "a")))
    waiting = asyncio.create_task(stream.wait_room())
    await settle()
    assert not waiting.done()
    stream.close()
    await asyncio.wait_for(waiting, 1)
    assert not await stream.drain(within_s=0.05)
    await stream.cancel()
    assert stream.in_hand == 0
    assert rec.finished == []


@pytest.mark.parametrize("limit", [0, 1])
async def test_limit_is_at_least_one(limit: int) -> None:
    rec = Recorder()
    stream = KeyedStream(limit, rec.handle, rec.on_prefix)
    assert stream.room == 1
    await stream.wait_room()
