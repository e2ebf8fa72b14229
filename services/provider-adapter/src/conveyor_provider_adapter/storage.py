"""Durable copies of prediction outputs (Replicate deletes them after an hour).

One interface, :class:`Storage`, with a filesystem backend and an S3-compatible backend (AWS S3,
Cloudflare R2, MinIO via ``endpoint_url``). Both take an async stream of chunks, so a file is never
held whole in memory: the filesystem backend writes a temporary file and renames it into place; the
S3 backend does a single PUT for small files and a multipart upload (8 MiB parts) for larger ones,
aborting the upload when the stream fails (e.g. the size limit was hit).

:class:`OutputCopier` finds the URLs in an output value (a string, a list, or a dict's values,
recursively), downloads each only from allow-listed hosts (no redirects, size and time limits) and
stores it under a deterministic key, so copying the same output twice overwrites the same object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import quote

from yarl import URL

from conveyor_provider_adapter.file_writer import BatchWriter
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.web_client import MaybeSent, NotSent, WebClient

logger = logging.getLogger(__name__)

S3_PART_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True)
class StoredObject:
    """Where a stored file ended up."""

    url: str
    key: str
    size: int


class Storage(Protocol):
    """A place to keep output files."""

    name: str

    async def put(
        self, key: str, chunks: AsyncIterator[bytes], content_type: str | None
    ) -> StoredObject:
        """Store the stream under ``key`` (replacing it); nothing is left behind if it fails."""
        ...

    async def close(self) -> None:
        """Release clients."""
        ...


def _public_url(base: str | None, key: str) -> str | None:
    if not base:
        return None
    return f"{base.rstrip('/')}/{quote(key)}"


INLINE_BYTES = 1024 * 1024
"""Outputs up to this size are buffered and written whole by the storage's :class:`BatchWriter`."""


def _open_temporary(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=str(path.parent), prefix=".part-")


def _finish(handle: Any, tmp_name: str, path: Path) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    os.replace(tmp_name, path)


class FilesystemStorage:
    """Files under a root directory (a mounted volume)."""

    name = "filesystem"

    def __init__(self, root: Path, *, public_base_url: str | None = None) -> None:
        self.root = root
        self.public_base_url = public_base_url
        self._writer = BatchWriter()
        self._resolved_root = root.resolve()
        """The root's real path, for file URLs (resolved once: ``Path.resolve`` of every stored
        file cost an ``lstat`` per path component, ~6% of the adapter's CPU, profiled)."""

    def path_of(self, key: str) -> Path:
        """The file of ``key`` (keys never escape the root)."""
        parts = PurePosixPath(key).parts
        if not parts or any(p in ("..", "") or p.startswith("/") for p in parts):
            raise ValueError(f"bad storage key {key!r}")
        return self.root.joinpath(*parts)

    async def put(
        self, key: str, chunks: AsyncIterator[bytes], content_type: str | None
    ) -> StoredObject:
        """Write atomically (a temporary file, fsync, rename). An output that fits in
        ``INLINE_BYTES`` is written whole by the batch writer; a larger one streams."""
        path = self.path_of(key)
        head: list[bytes] = []
        size = 0
        async for chunk in chunks:
            head.append(chunk)
            size += len(chunk)
            if size > INLINE_BYTES:
                break
        else:
            await self._writer.write(path, head)
            return self._stored(key, path, size)
        fd, tmp_name = await asyncio.to_thread(_open_temporary, path)
        try:
            with os.fdopen(fd, "wb") as handle:
                await asyncio.to_thread(handle.writelines, head)
                async for chunk in chunks:
                    await asyncio.to_thread(handle.write, chunk)
                    size += len(chunk)
                await asyncio.to_thread(_finish, handle, tmp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        return self._stored(key, path, size)

    def _stored(self, key: str, path: Path, size: int) -> StoredObject:
        url = (
            _public_url(self.public_base_url, key)
            or (self._resolved_root / path.relative_to(self.root)).as_uri()
        )
        return StoredObject(url=url, key=key, size=size)

    async def close(self) -> None:
        await self._writer.close()


class S3Storage:
    """Objects in an S3-compatible bucket (boto3 calls run in threads)."""

    name = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        public_base_url: str | None = None,
        part_size: int = S3_PART_SIZE,
        client: Any = None,
    ) -> None:
        if part_size < 5 * 1024 * 1024:
            raise ValueError("S3 multipart parts must be at least 5 MiB")
        self.bucket = bucket
        self.public_base_url = public_base_url
        self.part_size = part_size
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=Config(
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=60,
                    s3={"addressing_style": "path"},
                ),
            )
        self._client: Any = client

    async def put(
        self, key: str, chunks: AsyncIterator[bytes], content_type: str | None
    ) -> StoredObject:
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        buffer = bytearray()
        size = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in chunks:
                buffer += chunk
                size += len(chunk)
                while len(buffer) >= self.part_size:
                    if upload_id is None:
                        created = await asyncio.to_thread(
                            self._client.create_multipart_upload,
                            Bucket=self.bucket,
                            Key=key,
                            **extra,
                        )
                        upload_id = str(created["UploadId"])
                    body = bytes(buffer[: self.part_size])
                    del buffer[: self.part_size]
                    number = len(parts) + 1
                    answer = await asyncio.to_thread(
                        self._client.upload_part,
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                    )
                    parts.append({"ETag": answer["ETag"], "PartNumber": number})
            if upload_id is None:
                await asyncio.to_thread(
                    self._client.put_object,
                    Bucket=self.bucket,
                    Key=key,
                    Body=bytes(buffer),
                    **extra,
                )
            else:
                if buffer:
                    number = len(parts) + 1
                    answer = await asyncio.to_thread(
                        self._client.upload_part,
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=bytes(buffer),
                    )
                    parts.append({"ETag": answer["ETag"], "PartNumber": number})
                await asyncio.to_thread(
                    self._client.complete_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            if upload_id is not None:
                try:
                    await asyncio.to_thread(
                        self._client.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                    )
                except Exception:
                    logger.warning(
                        "abort of multipart upload failed",
                        extra={"action": "s3_abort_failed", "key": key},
                        exc_info=True,
                    )
            raise
        url = _public_url(self.public_base_url, key) or f"s3://{self.bucket}/{key}"
        return StoredObject(url=url, key=key, size=size)

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)


# --------------------------------------------------------------------------------------------------
# Copying outputs


class CopyError(Exception):
    """An output could not be copied; ``reason`` is a metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CopiedFile:
    """One output file: our URL (empty when the copy failed) and the provider's."""

    url: str
    source_url: str
    size_bytes: int
    content_type: str
    error: str = ""


def output_urls(output: Any) -> list[str]:
    """HTTP(S) URLs in an output value, in order: a string, list items, dict values (recursive)."""
    found: list[str] = []

    def walk(value: Any, depth: int) -> None:
        if depth > 8:
            return
        if isinstance(value, str):
            if value.startswith(("https://", "http://")):
                found.append(value)
        elif isinstance(value, list):
            for item in value:
                walk(item, depth + 1)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item, depth + 1)

    walk(output, 0)
    return found


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Exact host match, or ``*.domain`` matching subdomains of ``domain``."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        pattern = entry.lower().strip()
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _host_of(source: str) -> str:
    """The host of an output URL, for logs ("" when there is none)."""
    try:
        return URL(source).host or "" if "://" in source else ""
    except ValueError:
        return ""


def _basename(url: URL, index: int) -> str:
    name = PurePosixPath(url.path).name or f"output-{index}"
    name = _SAFE.sub("_", name).strip("._") or f"output-{index}"
    return name[:120]


class OutputCopier:
    """Downloads allow-listed output URLs and stores them through a :class:`Storage`."""

    def __init__(
        self,
        storage: Storage,
        *,
        allowed_hosts: Sequence[str],
        allow_http: bool = False,
        max_bytes: int = 512 * 1024 * 1024,
        timeout_s: float = 120.0,
        prefix: str = "outputs/",
        metrics: AdapterMetrics | None = None,
        attempts: int = 3,
        parallel: int = 4,
    ) -> None:
        self.storage = storage
        self.allowed_hosts = list(allowed_hosts)
        self.allow_http = allow_http
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.prefix = prefix
        self.metrics = metrics
        self.attempts = max(1, attempts)
        self.parallel = max(1, parallel)
        self._http = WebClient(connect_timeout=5.0, read_timeout=30.0)

    async def close(self) -> None:
        """Close the download client and the storage."""
        await self._http.close()
        await self.storage.close()

    def check_url(self, raw: str) -> URL:
        """The parsed URL when policy allows downloading it; CopyError otherwise."""
        try:
            url = URL(raw)
            url.host  # noqa: B018 (a bad host raises here)
        except (ValueError, TypeError) as exc:
            raise CopyError("bad_url", f"unparseable output URL: {exc}") from exc
        if url.scheme == "https" or (url.scheme == "http" and self.allow_http):
            pass
        else:
            raise CopyError("scheme_not_allowed", f"output URL scheme {url.scheme!r} not allowed")
        if url.user is not None or url.password is not None:
            raise CopyError("bad_url", "output URL carries credentials")
        if not url.host or not host_allowed(url.host, self.allowed_hosts):
            raise CopyError("host_not_allowed", f"output host {url.host!r} is not allow-listed")
        return url

    async def copy_all(self, output: Any, task_id: str, attempt: int) -> list[CopiedFile]:
        """Copy every output URL, up to ``parallel`` at a time (a storyboard's images do not wait
        for each other), in the output's order; a failed copy yields a file with an empty ``url``
        and ``error``."""
        sources = output_urls(output)
        if len(sources) == 1:
            return [await self._copy_one(sources[0], task_id, attempt, 0)]
        gate = asyncio.Semaphore(self.parallel)

        async def one(index: int, source: str) -> CopiedFile:
            async with gate:
                return await self._copy_one(source, task_id, attempt, index)

        return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(sources))))

    async def _copy_one(self, source: str, task_id: str, attempt: int, index: int) -> CopiedFile:
        try:
            url = self.check_url(source)
        except CopyError as exc:
            self._failed(exc.reason, source, str(exc))
            return CopiedFile("", source, 0, "", error=exc.reason)
        safe_task = _SAFE.sub("_", task_id)[:200] or "task"
        key = f"{self.prefix}{safe_task}/{attempt}/{index:03d}-{_basename(url, index)}"
        last: CopyError | None = None
        for n in range(1, self.attempts + 1):
            try:
                stored, content_type = await asyncio.wait_for(
                    self._download_and_store(url, key), timeout=self.timeout_s
                )
            except CopyError as exc:
                last = exc
                if exc.reason in ("too_large", "http_4xx", "redirect"):
                    break
            except TimeoutError:
                last = CopyError("timeout", f"copy took longer than {self.timeout_s}s")
            except (NotSent, MaybeSent) as exc:
                last = CopyError("http", f"download failed: {exc}")
            except Exception as exc:
                last = CopyError("storage", f"storing failed: {exc!r}")
            else:
                if self.metrics:
                    self.metrics.output_bytes.labels(self.storage.name).inc(stored.size)
                    self.metrics.output_files.labels(self.storage.name).inc()
                return CopiedFile(stored.url, source, stored.size, content_type)
            if n < self.attempts:
                await asyncio.sleep(0.2 * 2 ** (n - 1))
        assert last is not None
        self._failed(last.reason, source, str(last))
        return CopiedFile("", source, 0, "", error=last.reason)

    def _failed(self, reason: str, source: str, message: str) -> None:
        if self.metrics:
            self.metrics.output_failures.labels(reason).inc()
        logger.warning(
            "output not copied",
            extra={
                "action": "output_copy_failed",
                "reason": reason,
                "source_host": _host_of(source),
                "error": message[:300],
            },
        )

    async def _download_and_store(self, url: URL, key: str) -> tuple[StoredObject, str]:
        async with self._http.stream(url) as response:
            status = response.status
            if 300 <= status < 400 and "location" in response.headers:
                raise CopyError("redirect", f"output URL redirects ({status})")
            if 400 <= status < 500:
                raise CopyError("http_4xx", f"output download answered {status}")
            if status != 200:
                raise CopyError("http", f"output download answered {status}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise CopyError("too_large", f"output is {declared} bytes > {self.max_bytes}")
            content_type = response.headers.get("content-type", "").split(";")[0].strip()
            limit = self.max_bytes

            async def limited() -> AsyncIterator[bytes]:
                seen = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    seen += len(chunk)
                    if seen > limit:
                        raise CopyError("too_large", f"output exceeds {limit} bytes")
                    yield chunk

            stored = await self.storage.put(key, limited(), content_type or None)
            return stored, content_type
