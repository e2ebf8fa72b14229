"""FilesystemStorage writes atomically whatever the size: a small output in one worker-thread call,
a large one streamed, and a stream that fails leaves neither the file nor a temporary part."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor_provider_adapter import storage
from conveyor_provider_adapter.storage import FilesystemStorage


async def chunks(parts: list[bytes], fail_after: int | None = None) -> AsyncIterator[bytes]:
    for i, part in enumerate(parts):
        if fail_after is not None and i == fail_after:
            raise ConnectionError("download cut")
        yield part


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".part-*"))


@pytest.mark.parametrize("sizes", [[10, 20], [storage.INLINE_BYTES, 5, 70_000]])
async def test_small_and_large_outputs_are_stored_whole(tmp_path: Path, sizes: list[int]) -> None:
    parts = [bytes([65 + i]) * n for i, n in enumerate(sizes)]
    fs = FilesystemStorage(tmp_path, public_base_url="https://cdn.example.com/o")
    stored = await fs.put("outputs/t/1/000-a.png", chunks(parts), "image/png")
    path = tmp_path / "outputs" / "t" / "1" / "000-a.png"
    assert path.read_bytes() == b"".join(parts)
    assert stored.size == sum(sizes)
    assert stored.url == "https://cdn.example.com/o/outputs/t/1/000-a.png"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("parts", [[b"x" * 10, b"y"], [b"x" * storage.INLINE_BYTES, b"y", b"z"]])
async def test_a_failed_stream_leaves_nothing(tmp_path: Path, parts: list[bytes]) -> None:
    fs = FilesystemStorage(tmp_path)
    with pytest.raises(ConnectionError):
        await fs.put("outputs/t/1/000-a.png", chunks(parts, fail_after=len(parts) - 1), None)
    assert not (tmp_path / "outputs" / "t" / "1" / "000-a.png").exists()
    assert leftovers(tmp_path) == []


async def test_without_a_public_base_the_url_is_the_files_real_path(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    fs = FilesystemStorage(tmp_path / "link")  # a root reached through a symlink
    stored = await fs.put("outputs/t/1/000-a b.png", chunks([b"png"]), "image/png")
    assert stored.url == (real / "outputs" / "t" / "1" / "000-a b.png").as_uri()
    assert stored.url.startswith("file:///")
    assert "%20" in stored.url
    assert (real / "outputs" / "t" / "1" / "000-a b.png").read_bytes() == b"png"
