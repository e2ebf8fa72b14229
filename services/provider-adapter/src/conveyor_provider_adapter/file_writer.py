"""Small files written atomically by one thread, in batches (a group commit).

A file is written as a temporary file in its directory, its bytes, an ``fsync`` and a rename into
place, so a reader sees the whole file or none and a stored file survives a crash. Done as one
worker-thread call per file (``asyncio.to_thread``), the hand-offs cost more than the writes: the
default executor runs up to six threads that contend with the event loop for the GIL at every
syscall's return (measured: 0.94 ms of the adapter's CPU per 16 KiB output copied at 8 at a time,
0.69 with this writer). One thread takes every file queued while it worked, writes them all, syncs
them all, renames them all and wakes each waiting loop once for the batch. A lone file waits for
nothing.

The syncs of a batch run side by side (``SYNC_THREADS``): the ``fsync`` of a new file waits for a
journal commit, and one after the other each waited for its own, while concurrent ones share it.
At 100 tasks/s in the pipeline, with PostgreSQL committing on the same disk, a file's sync took
3.6 ms one after the other (2.5 in batches of five or more) and 2.0 side by side (1.05), and a
finished prediction's result went out after 90 ms instead of 124 (medians from the webhook's
answer); the adapter's CPU per copy did not grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import tempfile
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MAX_BATCH = 64
"""Files written per batch (a backlog is worked through in batches of this many)."""

SYNC_THREADS = 8
"""Threads syncing a batch's files side by side (started as a batch first needs them)."""


@dataclass(slots=True)
class _Job:
    path: Path
    data: list[bytes]
    future: asyncio.Future[None]
    fd: int = -1
    tmp: str = ""
    error: BaseException | None = field(default=None)


def _open(job: _Job) -> None:
    job.path.parent.mkdir(parents=True, exist_ok=True)
    job.fd, job.tmp = tempfile.mkstemp(dir=str(job.path.parent), prefix=".part-")
    for piece in job.data:
        view = memoryview(piece)
        while view:
            view = view[os.write(job.fd, view) :]


def _fsync(job: _Job) -> None:
    os.fsync(job.fd)


def _write_batch(jobs: list[_Job], syncer: ThreadPoolExecutor | None = None) -> None:
    """Write, sync and rename every job's file; a job that fails records its error and leaves
    neither its file nor its temporary part. ``syncer`` syncs the files side by side."""
    for job in jobs:
        try:
            _open(job)
        except Exception as exc:  # handed to the job's waiter
            job.error = exc
    opened = [job for job in jobs if job.error is None]
    if syncer is not None and len(opened) > 1:
        for job, synced in [(job, syncer.submit(_fsync, job)) for job in opened]:
            error = synced.exception()
            if error is not None:
                job.error = error
    else:
        for job in opened:
            try:
                _fsync(job)
            except Exception as exc:
                job.error = exc
    for job in jobs:
        if job.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(job.fd)
        if job.error is None:
            try:
                os.replace(job.tmp, job.path)
            except OSError as exc:
                job.error = exc
        if job.error is not None and job.tmp:
            with contextlib.suppress(OSError):
                os.unlink(job.tmp)


def _settle(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.future.done():  # the waiter gave up (a copy's timeout): the file stays written
            continue
        if job.error is None:
            job.future.set_result(None)
        else:
            job.future.set_exception(job.error)


class BatchWriter:
    """Atomic, durable writes of whole files by one lazily started thread."""

    def __init__(self, max_batch: int = MAX_BATCH, sync_threads: int = SYNC_THREADS) -> None:
        self.max_batch = max_batch
        self.sync_threads = sync_threads
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        """The running thread's queue (each thread has its own: a write racing :meth:`close`
        starts a new thread, and the closing one still gets its stop)."""
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0
        """Batches written (tests)."""

    async def write(self, path: Path, data: list[bytes]) -> None:
        """Write ``data`` to ``path`` atomically and durably (replacing it)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._thread is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._run, args=(self._queue,), name="output-writer", daemon=True
                )
                self._thread.start()
            self._queue.put(_Job(path, data, future))
        await future

    async def close(self) -> None:
        """Finish the files queued, then stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._queue.put(None)  # after every job of this thread: it finishes them first
        await asyncio.to_thread(thread.join)

    def _run(self, jobs_in: queue.SimpleQueue[_Job | None]) -> None:
        with ThreadPoolExecutor(self.sync_threads, thread_name_prefix="output-fsync") as syncer:
            self._work(jobs_in, syncer)

    def _work(self, jobs_in: queue.SimpleQueue[_Job | None], syncer: ThreadPoolExecutor) -> None:
        stopping = False
        while not stopping:
            first = jobs_in.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self.max_batch:
                try:
                    job = jobs_in.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
            _write_batch(jobs, syncer)
            self.batches += 1
            by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = defaultdict(list)
            for job in jobs:
                by_loop[job.future.get_loop()].append(job)
            for loop, settled in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(_settle, settled)
