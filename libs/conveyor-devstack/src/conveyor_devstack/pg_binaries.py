"""PostgreSQL server binaries on the machine (Debian's ``/usr/lib/postgresql/<major>/bin`` or
``CONVEYOR_PG_BINDIR``), preferring major 15.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from conveyor_devstack.errors import DevstackError

log = logging.getLogger(__name__)

BINDIR_ENV = "CONVEYOR_DEVSTACK_PG_BINDIR"
"""Directory holding initdb and postgres, when they are not found by pg_config or the Debian glob."""


PREFERRED_MAJOR = 15


@dataclass(frozen=True)
class PgBinaries:
    """Where the server binaries are and which version they are."""

    bindir: Path
    version: str

    @property
    def major(self) -> int:
        """15 for ``15.14``."""
        return int(self.version.split(".")[0])


def _version_of(bindir: Path) -> str | None:
    for tool in ("initdb", "postgres"):
        if not os.access(bindir / tool, os.X_OK):
            return None
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)?)", out)
    return found.group(1) if found else None


def _candidate_bindirs() -> list[Path]:
    candidates: list[Path] = []
    if explicit := os.environ.get(BINDIR_ENV):
        return [Path(explicit)]
    if pg_config := shutil.which("pg_config"):
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin"):
        candidates.extend(Path(p) for p in sorted(glob.glob(pattern)))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    return candidates


def find_pg_binaries() -> PgBinaries:
    """The PostgreSQL server binaries to run, preferring major version 15."""
    found: list[PgBinaries] = []
    seen: set[Path] = set()
    for bindir in _candidate_bindirs():
        if bindir in seen:
            continue
        seen.add(bindir)
        version = _version_of(bindir)
        if version is not None:
            found.append(PgBinaries(bindir=bindir, version=version))
    if not found:
        raise DevstackError(
            "PostgreSQL server binaries (initdb, postgres) not found: looked at `pg_config "
            "--bindir`, /usr/lib/postgresql/*/bin and PATH. Install them (Debian: `apt-get install "
            f"postgresql-{PREFERRED_MAJOR}`), or set {BINDIR_ENV}, or point "
            "CONVEYOR_TEST_DATABASE_URL at a running server."
        )
    found.sort(key=lambda b: (b.major != PREFERRED_MAJOR, -b.major))
    chosen = found[0]
    if chosen.major != PREFERRED_MAJOR:
        log.warning(
            "devstack: PostgreSQL %s not found, using %s from %s",
            PREFERRED_MAJOR,
            chosen.version,
            chosen.bindir,
        )
    return chosen
