"""Apache Kafka for the devstack, installed without a container: the distribution resolved from Maven
Central with ``mvn`` (the pom in the repository pins the version) into a cache, the machine's Java
found, the KRaft cluster id made, and a broker's answer checked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from conveyor_common.kafka.security import PLAINTEXT, KafkaSecurity
from conveyor_devstack import _process
from conveyor_devstack.errors import DevstackError

log = logging.getLogger(__name__)

CACHE_ENV = "CONVEYOR_DEVSTACK_CACHE"


POM_ENV = "CONVEYOR_DEVSTACK_KAFKA_POM"


JAVA_ENV = "CONVEYOR_DEVSTACK_JAVA"


MVN_ENV = "CONVEYOR_DEVSTACK_MVN"


POM_RELATIVE = Path("devstack/kafka/pom.xml")


def repo_root() -> Path | None:
    """The checkout holding ``devstack/kafka/pom.xml`` (searched up from here, then from cwd)."""
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in (start, *start.parents):
            if (parent / POM_RELATIVE).is_file():
                return parent
    return None


def find_pom() -> Path:
    """The pom.xml that resolves the Kafka jars."""
    if explicit := os.environ.get(POM_ENV):
        return Path(explicit)
    root = repo_root()
    if root is None:
        raise DevstackError(
            f"cannot find {POM_RELATIVE} above {Path(__file__).parent} or the current directory; "
            f"run from the Conveyor checkout or set {POM_ENV}"
        )
    return root / POM_RELATIVE


def cache_dir() -> Path:
    """Where resolved jars are kept (``CONVEYOR_DEVSTACK_CACHE`` or ``<repo>/.cache/devstack``)."""
    if explicit := os.environ.get(CACHE_ENV):
        return Path(explicit)
    root = repo_root()
    if root is not None:
        return root / ".cache" / "devstack"
    return Path.home() / ".cache" / "conveyor-devstack"


def kafka_version(pom: Path | None = None) -> str:
    """The ``kafka.version`` property of the pom, e.g. ``4.1.1``."""
    text = (pom or find_pom()).read_text(encoding="utf-8")
    found = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", text)
    if not found:
        raise DevstackError(f"no <kafka.version> property in {pom}")
    return found.group(1)


def find_mvn() -> str:
    """The mvn executable; DevstackError saying how to get one when it is missing."""
    mvn = os.environ.get(MVN_ENV) or shutil.which("mvn")
    if not mvn:
        raise DevstackError(
            "Apache Maven (mvn) not found: it resolves the Kafka jars from Maven Central once, into "
            f"{cache_dir()}. Install it (Debian: `apt-get install maven`), or set {MVN_ENV}, or "
            "point CONVEYOR_TEST_KAFKA_BOOTSTRAP at a running broker."
        )
    return mvn


def find_java() -> str:
    """A Java >= 17 executable; DevstackError saying how to get one when it is missing."""
    java = os.environ.get(JAVA_ENV)
    if not java and (home := os.environ.get("JAVA_HOME")):
        candidate = Path(home) / "bin" / "java"
        java = str(candidate) if candidate.is_file() else None
    java = java or shutil.which("java")
    hint = (
        "Install a JDK/JRE 17+ (Debian: `apt-get install openjdk-17-jre-headless`), or set "
        f"{JAVA_ENV}/JAVA_HOME, or point CONVEYOR_TEST_KAFKA_BOOTSTRAP at a running broker."
    )
    if not java:
        raise DevstackError(f"java not found: the Kafka broker runs on Java 17+. {hint}")
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=True
        ).stderr
    except (OSError, subprocess.SubprocessError) as exc:
        raise DevstackError(f"`{java} -version` failed ({exc}). {hint}") from None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    major = int(found.group(1)) if found else 0
    if major == 1 and found and found.group(2):  # "1.8.0_x"
        major = int(found.group(2))
    if major < 17:
        raise DevstackError(f"{java} is Java {major or '?'}; Kafka 4 needs Java 17+. {hint}")
    return java


def _pom_digest(pom: Path) -> str:
    return hashlib.sha256(pom.read_bytes()).hexdigest()


def fetch_kafka(*, force: bool = False, timeout: float = 600.0) -> Path:
    """Resolve the Kafka jars into the cache (once; safe across processes); return the libs dir."""
    pom = find_pom()
    version = kafka_version(pom)
    base = cache_dir() / f"kafka-{version}"
    libs = base / "libs"
    stamp = base / "complete"
    digest = _pom_digest(pom)

    def cached() -> bool:
        with contextlib.suppress(OSError):
            return stamp.read_text().strip() == digest and any(libs.glob("kafka_*.jar"))
        return False

    if cached() and not force:
        return libs
    base.mkdir(parents=True, exist_ok=True)
    with open(base.parent / f"kafka-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be fetching the same jars
        if cached() and not force:
            return libs
        mvn = find_mvn()
        started = time.monotonic()
        log.info("devstack: resolving Kafka %s jars from Maven Central into %s", version, libs)
        staging = base / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        _process.run(
            [
                mvn,
                "-q",
                "-B",
                "-Dstyle.color=never",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
            ],
            what="mvn (resolving the Kafka jars)",
            cwd=pom.parent,
            env=dict(os.environ),
            timeout=timeout,
        )
        if not any(staging.glob("kafka_*.jar")):
            raise DevstackError(f"mvn finished but put no kafka_*.jar in {staging}")
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        stamp.write_text(digest + "\n")
        log.info(
            "devstack: Kafka %s jars resolved (%d files, %.1fs)",
            version,
            len(list(libs.iterdir())),
            time.monotonic() - started,
        )
    return libs


def _cluster_id() -> str:
    """A random KRaft cluster id (22 url-safe base64 characters) that never begins with ``-``: the
    storage tool would take such an id for an option (1 start in 64 failed). Kafka's own
    ``Uuid.randomUuid`` draws again in that case too."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


_T = TypeVar("_T")


def run_coroutine_sync(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion on a private event loop in a worker thread.

    Never touches the calling thread's event loop (pytest-asyncio's session loop stays untouched).
    """
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="conveyor-devstack-sync", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def broker_answers(
    bootstrap: str, *, request_timeout_ms: int = 5000, security: KafkaSecurity = PLAINTEXT
) -> list[int]:
    """Node ids in the metadata the broker at ``bootstrap`` returns (raises when it does not)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=request_timeout_ms,
        **security.client_kwargs(),
    )
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        return [int(b["node_id"]) for b in cluster.get("brokers", [])]
    finally:
        await admin.close()
