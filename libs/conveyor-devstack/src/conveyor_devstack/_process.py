"""Child processes that cannot outlive us.

Every long-running server the devstack starts (postgres, the Kafka JVM) is spawned

* in its own session / process group, so stopping it never signals our own group and a stop can
  sweep the whole group;
* with ``PR_SET_PDEATHSIG = SIGKILL`` (Linux), so the kernel kills it when the thread that spawned it
  dies, even when the test run itself is SIGKILLed and no ``atexit`` handler runs. The signal is tied
  to the spawning *thread*: spawn servers from a long-lived thread (the main thread, or the thread
  running the event loop), never from a short-lived worker thread;
* optionally as an unprivileged user (PostgreSQL refuses to run as root).

Every instance lives in its own directory under ``<tmp>/conveyor-devstack/``, named with the pid of
its owner; directories whose owner is gone (a SIGKILLed run) are removed by the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from conveyor_devstack.errors import DevstackError

ModeT = TypeVar("ModeT")
ModeT_contra = TypeVar("ModeT_contra", contravariant=True)
LocalT = TypeVar("LocalT", bound="LocalServer[Any]")

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LIBC: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)

KEEP_DIRS_ENV = "CONVEYOR_DEVSTACK_KEEP"
"""Set to 1 to keep instance directories (data, logs) after stop, for debugging."""


@dataclass(frozen=True)
class RunAs:
    """An unprivileged user to run a server as."""

    name: str
    uid: int
    gid: int
    home: str


def unprivileged_user(name: str) -> RunAs | None:
    """``name``'s ids when we are root (servers then run as that user), else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise DevstackError(
            f"running as root, and PostgreSQL refuses to run as root, but there is no {name!r} "
            f"system user to run it as: create one (`useradd --system {name}`) or run as non-root"
        ) from None
    return RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir)


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    libc = _LIBC

    def preexec() -> None:  # runs in the child between fork and exec: keep it tiny
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _launch_args(argv: Sequence[str], run_as: RunAs | None) -> dict[str, Any]:
    """How to start a child that dies with us (and runs as ``run_as``).

    With util-linux's ``setpriv`` the death signal and the user are set by the child's first exec,
    so Python starts it with vfork/posix_spawn and runs no fork handlers: a test process whose gRPC
    threads are busy has had a forked child abort in gRPC's atfork handler (SIGABRT before exec).
    Without ``setpriv``: fork with a tiny pre-exec function, as before.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        prefix = [setpriv, "--pdeathsig", "KILL"]
        if run_as is not None:
            prefix += [f"--reuid={run_as.uid}", f"--regid={run_as.gid}", "--clear-groups"]
        return {"args": [*prefix, "--", *argv]}
    return {
        "args": list(argv),
        "preexec_fn": _die_with_parent(os.getpid()),
        "user": None if run_as is None else run_as.uid,
        "group": None if run_as is None else run_as.gid,
        "extra_groups": None if run_as is None else [],
    }


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    cwd: Path,
    env: dict[str, str],
    run_as: RunAs | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running server; its stdout and stderr go to ``log_path``."""
    with open(log_path, "ab") as out:
        if run_as is not None:
            os.chown(log_path, run_as.uid, run_as.gid)
        return subprocess.Popen(
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
            **_launch_args(argv, run_as),
        )


def run(
    argv: Sequence[str],
    *,
    what: str,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    run_as: RunAs | None = None,
) -> str:
    """Run a short command to completion; raise DevstackError with its output when it fails."""
    try:
        proc = subprocess.run(
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            timeout=timeout,
            check=False,
            start_new_session=True,
            **_launch_args(argv, run_as),
        )
    except subprocess.TimeoutExpired as exc:
        partial = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else ""
        raise DevstackError(
            f"{what} did not finish within {timeout:.0f}s: {' '.join(argv)}\n{tail_text(partial)}"
        ) from None
    output = bytes(proc.stdout).decode(errors="replace")
    if proc.returncode != 0:
        raise DevstackError(
            f"{what} failed with exit code {proc.returncode}: {' '.join(argv)}\n{tail_text(output)}"
        )
    return output


def stop_process(
    proc: subprocess.Popen[bytes], sig: signal.Signals, *, timeout: float, what: str
) -> None:
    """Send ``sig`` to ``proc``, wait for it, then SIGKILL whatever is left of its group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "devstack: %s did not stop within %.0fs after %s; killing it",
                what,
                timeout,
                sig.name,
            )
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


PORT_CLASH = "Address already in use"
"""In a server's log when another process bound the port between ``free_ports`` and the server."""
FIRST_START_ATTEMPTS = 3


def port_clash(exc: BaseException) -> bool:
    """Whether a start failed because the chosen port was taken meanwhile."""
    return isinstance(exc, DevstackError) and PORT_CLASH in str(exc)


def set_aside(log_file: Path) -> None:
    """Move a log to ``<name>.1`` so the next attempt starts a clean one."""
    with contextlib.suppress(FileNotFoundError):
        log_file.replace(log_file.with_name(log_file.name + ".1"))


def tail_file(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return tail_text(text, lines)


def tail_text(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of ``text``, indented for an error message."""
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join("    " + line for line in kept) if kept else "    (no output)"


def _instances_root() -> Path:
    root = Path(tempfile.gettempdir()) / "conveyor-devstack"
    root.mkdir(mode=0o755, exist_ok=True)
    return root


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_instances() -> None:
    """Remove instance directories left by runs that died without cleaning up."""
    root = _instances_root()
    for entry in root.iterdir():
        parts = entry.name.split("-")
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid != os.getpid() and not _pid_alive(pid):
            log.info("devstack: removing stale instance dir %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def instance_dir(kind: str) -> Path:
    """A fresh directory ``<tmp>/conveyor-devstack/<kind>-<ourpid>-<random>``."""
    sweep_stale_instances()
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=_instances_root()))


def remove_instance_dir(path: Path) -> None:
    """Delete an instance directory unless CONVEYOR_DEVSTACK_KEEP=1."""
    if os.environ.get(KEEP_DIRS_ENV) == "1":
        log.info("devstack: keeping %s (%s=1)", path, KEEP_DIRS_ENV)
        return
    shutil.rmtree(path, ignore_errors=True)


def monotonic_deadline(timeout: float) -> float:
    """A ``time.monotonic()`` value ``timeout`` seconds from now."""
    return time.monotonic() + timeout


class LocalServer(Protocol[ModeT_contra]):
    """What a server handle needs of the local process behind it."""

    def stop(self, mode: ModeT_contra) -> None: ...

    def start(self) -> None: ...

    async def start_async(self) -> None: ...

    def close(self) -> None: ...


class ServerHandle(Generic[LocalT, ModeT]):
    """The backend-independent part of a reachable server (PostgreSQL, Kafka): restarts for the
    local-process backend, and an idempotent ``close`` that stops and deletes what it started."""

    kind = "server"
    """Named in the error for restarts of a non-local backend."""

    def __init__(
        self, backend: str, local: LocalT | None, closer: Callable[[], None] | None
    ) -> None:
        self.backend = backend
        self._local = local
        self._closer = closer
        self._closed = False

    @property
    def can_restart(self) -> bool:
        """Whether ``stop``/``start`` are available (local-process backend only)."""
        return self._local is not None

    @property
    def local(self) -> LocalT:
        """The local process behind this server; DevstackError for other backends."""
        if self._local is None:
            raise DevstackError(
                f"stop/start need the local-process backend; this {self.kind} is {self.backend!r}"
            )
        return self._local

    def _stop(self, mode: ModeT) -> None:
        self.local.stop(mode)

    async def _stop_async(self, mode: ModeT) -> None:
        await asyncio.to_thread(self.local.stop, mode)

    def start(self) -> None:
        """Start a stopped server again (same port, same data); local only."""
        self.local.start()

    async def start_async(self) -> None:
        """``start`` without blocking the event loop (the process is spawned in the loop thread)."""
        await self.local.start_async()

    def close(self) -> None:
        """Stop and delete what this devstack started; a no-op for servers from the environment."""
        if self._closed:
            return
        self._closed = True
        if self._local is not None:
            self._local.close()
        if self._closer is not None:
            self._closer()
