"""Output files with real, deterministic bytes: a valid PNG or an ISO-BMFF (MP4-like) blob of a given size.

Bytes are generated on the fly in chunks (so large files do not sit in memory) from an RNG seeded by
the prediction id and file name; the same URL always yields the same bytes.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

FileKind = Literal["png", "mp4"]
CHUNK = 64 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PAD_TYPE = b"fkPd"  # ancillary, private, safe-to-copy chunk: decoders skip it


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_IHDR = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0))  # 1x1 RGBA
_IDAT = _png_chunk(b"IDAT", zlib.compress(b"\x00\x2a\x7f\xd4\xff"))
_IEND = _png_chunk(b"IEND", b"")
PNG_MIN_SIZE = len(_PNG_SIGNATURE) + len(_IHDR) + len(_IDAT) + len(_IEND)
_FTYP = struct.pack(">I", 24) + b"ftypisom" + struct.pack(">I", 0x200) + b"isommp41"
MP4_MIN_SIZE = len(_FTYP) + 8


@dataclass(frozen=True, slots=True)
class OutputFile:
    name: str
    kind: FileKind
    size: int  # requested size; the real size is at least the format's minimum
    seed: str

    @property
    def content_type(self) -> str:
        return "image/png" if self.kind == "png" else "video/mp4"

    @property
    def length(self) -> int:
        if self.kind == "mp4":
            return max(self.size, MP4_MIN_SIZE)
        pad = self.size - PNG_MIN_SIZE
        if pad <= 0:
            return PNG_MIN_SIZE
        return PNG_MIN_SIZE + max(pad, 12)  # a padding chunk is at least 12 bytes

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes, in pieces of at most CHUNK bytes (headers may be smaller)."""
        rng = random.Random(self.seed)
        if self.kind == "png":
            yield from _png(self.length, rng)
        else:
            yield from _mp4(self.length, rng)

    def read(self) -> bytes:
        return b"".join(self.chunks())


def _random_pieces(n: int, rng: random.Random, crc: list[int] | None = None) -> Iterator[bytes]:
    remaining = n
    while remaining > 0:
        piece = rng.randbytes(min(CHUNK, remaining))
        if crc is not None:
            crc[0] = zlib.crc32(piece, crc[0])
        remaining -= len(piece)
        yield piece


def _png(total: int, rng: random.Random) -> Iterator[bytes]:
    yield _PNG_SIGNATURE + _IHDR
    pad = total - PNG_MIN_SIZE  # 0 or >= 12 (see OutputFile.length)
    if pad >= 12:
        data_len = pad - 12
        crc = [zlib.crc32(_PAD_TYPE)]
        yield struct.pack(">I", data_len) + _PAD_TYPE
        yield from _random_pieces(data_len, rng, crc)
        yield struct.pack(">I", crc[0] & 0xFFFFFFFF)
    yield _IDAT + _IEND


def _mp4(total: int, rng: random.Random) -> Iterator[bytes]:
    mdat_len = total - len(_FTYP)
    yield _FTYP + struct.pack(">I", mdat_len) + b"mdat"
    yield from _random_pieces(mdat_len - 8, rng)
