"""The built wheels on Python 3.11, 3.12 and 3.13: fresh virtual environments (uv), the core SDK
without the [cli] extra, the SDK checks and the README's "Use from Python" program against a live
stack. An interpreter that is not installed is skipped, except 3.12/3.13 under CI=true."""

from __future__ import annotations

import asyncio
import glob
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor_testkit.stack import Stack, start_stack

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ["3.11", "3.12", "3.13"]
REQUIRED_IN_CI = {"3.12", "3.13"}


def _uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def _interpreter(version: str) -> str | None:
    """pyenv's interpreter of that minor version, else one on PATH."""
    home = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = sorted(glob.glob(str(home / "versions" / f"{version}.*" / "bin" / "python")))
    if candidates:
        return candidates[-1]
    return shutil.which(f"python{version}")


def readme_program() -> str:
    """The Python block of the README's "Use from Python" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block in the README's Use from Python section"
    return match.group(1)


@pytest.fixture(scope="module")
async def stack(database_url: str) -> AsyncIterator[Stack]:
    s = await start_stack(database_url)
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("dist")
    for lib in ("conveyor-protos", "conveyor-client"):
        subprocess.run(
            [
                *_uv(),
                "build",
                "--quiet",
                "--wheel",
                "--out-dir",
                str(out),
                str(ROOT / "libs" / lib),
            ],
            check=True,
            timeout=300,
        )
    built = sorted(out.glob("*.whl"))
    assert [w.name.split("-")[0] for w in built] == ["conveyor_client", "conveyor_protos"]
    return built


async def _run(*cmd: str, env: dict[str, str] | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    text = out.decode()
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{text}"
    return text


@pytest.mark.parametrize("version", VERSIONS)
async def test_wheels_on_python(
    version: str, stack: Stack, wheels: list[Path], tmp_path: Path
) -> None:
    interpreter = _interpreter(version)
    if interpreter is None:
        message = f"Python {version} is not installed (pyenv install {version})"
        if os.environ.get("CI", "").lower() == "true" and version in REQUIRED_IN_CI:
            pytest.fail(message + ": CI needs it")
        pytest.skip(message)
    venv = tmp_path / f"venv-{version}"
    await _run(*_uv(), "venv", "--quiet", "--python", interpreter, str(venv))
    python = str(venv / "bin" / "python")
    await _run(*_uv(), "pip", "install", "--quiet", "--python", python, *map(str, wheels))
    reported = await _run(python, "-c", "import sys; print(sys.version_info[:2])")
    assert reported.strip() == str(tuple(int(p) for p in version.split(".")))
    # The core SDK imports without the [cli] extra.
    await _run(python, "-c", "import conveyor_client, sys; assert 'rich' not in sys.modules")
    env = {
        **os.environ,
        "CONVEYOR_ADDRESS": stack.address,
        "CONVEYOR_TOKEN": stack.keys.token(f"matrix-{version.replace('.', '')}", tier="pro"),
    }
    env.pop("PYTHONPATH", None)
    checks = await _run(python, str(ROOT / "tests" / "sdk" / "sdk_checks.py"), env=env)
    assert checks.count("ok check_") == 4, checks
    program = tmp_path / "readme_example.py"
    program.write_text(readme_program())
    out = await _run(python, str(program), env=env)
    assert "NOT_FOUND" in out
    assert "120 tasks submitted" in out
