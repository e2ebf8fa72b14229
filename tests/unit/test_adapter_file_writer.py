"""The output writer's group commit: files queued while a batch is written go out together, each
whole or not at all, synced side by side, and one file's failure is its own."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conveyor_provider_adapter import file_writer
from conveyor_provider_adapter.file_writer import BatchWriter


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".part-*"))


async def test_files_queued_during_a_batch_are_written_in_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    started, release = threading.Event(), threading.Event()
    real = file_writer._write_batch

    def held(jobs: list[file_writer._Job], syncer: ThreadPoolExecutor | None = None) -> None:
        sizes.append(len(jobs))
        if len(sizes) == 1:
            started.set()
            release.wait(10)
        real(jobs, syncer)

    monkeypatch.setattr(file_writer, "_write_batch", held)
    writer = BatchWriter()
    first = asyncio.create_task(writer.write(tmp_path / "a" / "first.bin", [b"1"]))
    assert await asyncio.to_thread(started.wait, 10)
    rest = [
        asyncio.create_task(writer.write(tmp_path / "b" / f"{i}.bin", [b"x" * i, b"y"]))
        for i in range(10)
    ]
    await asyncio.sleep(0.05)  # every write queued while the first batch is held
    release.set()
    await asyncio.gather(first, *rest)
    await writer.close()
    assert sizes == [1, 10]
    assert writer.batches == 2
    assert (tmp_path / "a" / "first.bin").read_bytes() == b"1"
    for i in range(10):
        assert (tmp_path / "b" / f"{i}.bin").read_bytes() == b"x" * i + b"y"
    assert leftovers(tmp_path) == []


async def test_the_files_of_a_batch_are_synced_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One after the other, each new file's sync waited for its own journal commit."""
    started, release = threading.Event(), threading.Event()
    together = threading.Barrier(4, timeout=5)
    syncing: set[str] = set()
    real = file_writer._fsync

    def fsync(job: file_writer._Job) -> None:
        if not started.is_set():  # the lone first file: hold the writer while the rest queue
            started.set()
            release.wait(10)
        else:
            syncing.add(threading.current_thread().name)
            together.wait()  # every file of the batch is in its sync at once
        real(job)

    monkeypatch.setattr(file_writer, "_fsync", fsync)
    writer = BatchWriter()
    first = asyncio.create_task(writer.write(tmp_path / "first.bin", [b"1"]))
    assert await asyncio.to_thread(started.wait, 10)
    rest = [
        asyncio.create_task(writer.write(tmp_path / "t" / f"{i}.bin", [b"z" * i])) for i in range(4)
    ]
    await asyncio.sleep(0.05)  # queued behind the first
    release.set()
    await asyncio.gather(first, *rest)
    assert writer.batches == 2
    assert len(syncing) == 4
    assert all(name.startswith("output-fsync") for name in syncing)
    for i in range(4):
        assert (tmp_path / "t" / f"{i}.bin").read_bytes() == b"z" * i
    await writer.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("output-fsync")]
    assert leftovers(tmp_path) == []


async def test_a_failing_file_fails_alone_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"not a directory")
    writer = BatchWriter()
    results = await asyncio.gather(
        writer.write(tmp_path / "ok" / "1.bin", [b"one"]),
        writer.write(tmp_path / "plain" / "x" / "2.bin", [b"two"]),  # its parent is a file
        writer.write(tmp_path / "ok" / "3.bin", [b"three"]),
        return_exceptions=True,
    )
    await writer.close()
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], NotADirectoryError)
    assert (tmp_path / "ok" / "1.bin").read_bytes() == b"one"
    assert (tmp_path / "ok" / "3.bin").read_bytes() == b"three"
    assert (tmp_path / "plain").read_bytes() == b"not a directory"
    assert leftovers(tmp_path) == []


async def test_a_rename_that_fails_removes_the_temporary_part(tmp_path: Path) -> None:
    (tmp_path / "d" / "taken").mkdir(parents=True)  # a directory where the file should go
    writer = BatchWriter()
    with pytest.raises(IsADirectoryError):
        await writer.write(tmp_path / "d" / "taken", [b"data"])
    await writer.close()
    assert (tmp_path / "d" / "taken").is_dir()
    assert leftovers(tmp_path) == []


async def test_a_waiter_that_gives_up_leaves_the_file_written(tmp_path: Path) -> None:
    writer = BatchWriter()
    waiter = asyncio.create_task(writer.write(tmp_path / "slow.bin", [b"z" * 1000]))
    await asyncio.sleep(0)  # queued
    waiter.cancel()  # as a copy's timeout does
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await writer.close()  # finishes what was queued
    assert (tmp_path / "slow.bin").read_bytes() == b"z" * 1000
    assert leftovers(tmp_path) == []


async def test_close_stops_the_thread_and_a_later_write_starts_another(tmp_path: Path) -> None:
    writer = BatchWriter()
    await writer.write(tmp_path / "1.bin", [b"1"])
    names = {t.name for t in threading.enumerate()}
    assert "output-writer" in names
    await writer.close()
    assert "output-writer" not in {t.name for t in threading.enumerate()}
    await writer.close()  # twice is fine
    await writer.write(tmp_path / "2.bin", [b"2"])
    await writer.close()
    assert (tmp_path / "2.bin").read_bytes() == b"2"


async def test_a_write_racing_close_gets_a_thread_of_its_own(tmp_path: Path) -> None:
    writer = BatchWriter()
    await writer.write(tmp_path / "1.bin", [b"1"])
    closing = asyncio.create_task(writer.close())  # its stop is queued at once
    late = asyncio.create_task(writer.write(tmp_path / "2.bin", [b"2"]))
    await asyncio.wait_for(asyncio.gather(closing, late), timeout=10)  # neither hangs
    assert (tmp_path / "2.bin").read_bytes() == b"2"
    await asyncio.wait_for(writer.close(), timeout=10)
    assert "output-writer" not in {t.name for t in threading.enumerate()}
