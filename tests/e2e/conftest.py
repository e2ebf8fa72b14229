"""The session's end-to-end system: every Conveyor service as a real process on real backends.

One system serves every e2e test (its start costs ~10-15 s): 2 schedulers, 2 adapters, 1 notifier,
1 gateway and the fake Replicate, on the session's PostgreSQL (a fresh database) and on a Kafka broker
of its own (Conveyor's topic names are fixed, so a broker shared with other tests would mix their
records into ours; with ``CONVEYOR_TEST_KAFKA_BOOTSTRAP`` set the given broker is used). Each test
uses its own tenants. Logs of every process are under the session's tmp dir (``e2e-system*``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # tests.e2e.* helpers are imported by their package path
    sys.path.append(str(_ROOT))

from conveyor_devstack.errors import DevstackError  # noqa: E402
from conveyor_devstack.postgres import PostgresServer  # noqa: E402
from conveyor_devstack.stack import Devstack, start_kafka_async  # noqa: E402
from conveyor_devstack.system import ConveyorSystem  # noqa: E402
from tests.e2e.harness import E2E, session_config  # noqa: E402
from tests.e2e.otlp import OtlpReceiver  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The e2e tests run after every other test of the session, so the session-scoped system (started
    lazily by the first e2e test) is alive only while they run; the chaos test runs last of all: it
    restarts processes (and the backends) the other e2e tests share."""
    e2e_dir = Path(__file__).resolve().parent
    items.sort(
        key=lambda item: (
            e2e_dir in item.path.resolve().parents,
            item.path.name == "test_e2e_chaos.py",
        )
    )


_LOG_LEVELS = ('"level": "WARNING"', '"level": "ERROR"', '"level": "CRITICAL"')
_LOG_LINES = 40


def _clip(line: str, limit: int = 3000) -> str:
    """A long line's start and its end (a stack trace's last frames and its error)."""
    return line if len(line) <= limit else f"{line[: limit // 4]} ... {line[-3 * limit // 4 :]}"


def _service_warnings(run_dir: Path) -> str:
    """The last warnings and errors each process of the system logged (restart markers kept), so
    that a failure on a machine whose tmp dir is gone (CI) still shows what the services saw."""
    parts: list[str] = []
    for path in sorted(run_dir.glob("*.log")):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        kept = [
            ln for ln in lines if ln.startswith("--- start") or any(x in ln for x in _LOG_LEVELS)
        ]
        if any(not ln.startswith("--- start") for ln in kept):
            parts.append(f"== {path.name}\n" + "\n".join(_clip(ln) for ln in kept[-_LOG_LINES:]))
    return "\n".join(parts) or "(no warnings or errors logged)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed e2e test's report carries the services' warnings and errors (see above)."""
    report = yield
    harness = getattr(item, "funcargs", {}).get("e2e")
    system = harness.system if isinstance(harness, E2E) else None
    if report.failed and call.when == "call" and system is not None:
        report.sections.append(("service warnings and errors", _service_warnings(system.run_dir)))
    return report


def _unavailable(what: str, exc: BaseException) -> None:
    reason = f"e2e: {what}: {type(exc).__name__}: {exc}"
    if os.environ.get("CONVEYOR_ALLOW_SKIP") == "1":
        pytest.skip(reason)
    pytest.fail(reason, pytrace=False)


@pytest.fixture(scope="session")
async def otlp_receiver() -> AsyncIterator[OtlpReceiver]:
    """Where every service of the e2e system exports its spans (OTLP over gRPC)."""
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@pytest.fixture(scope="session")
async def e2e_system(
    devstack_postgres: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
    otlp_receiver: OtlpReceiver,
) -> AsyncIterator[ConveyorSystem]:
    """The running system (see the module docstring)."""
    try:
        kafka = await start_kafka_async()
    except (DevstackError, OSError) as exc:
        _unavailable("kafka could not start", exc)
        raise
    config = session_config(run_dir=tmp_path_factory.mktemp("e2e-system"))
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_receiver.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    for env in (config.scheduler_env, config.adapter_env, config.notifier_env, config.gateway_env):
        env.update(otel)
    system = ConveyorSystem(Devstack(devstack_postgres, kafka), config)
    try:
        try:
            await system.start()
        except DevstackError as exc:
            _unavailable("the system did not start", exc)
        yield system
    finally:
        await system.stop()
        await asyncio.to_thread(kafka.close)


@pytest.fixture(scope="session")
async def e2e(e2e_system: ConveyorSystem) -> AsyncIterator[E2E]:
    """Clients, tenants and the fake's ledger of the session system."""
    harness = E2E(e2e_system)
    try:
        yield harness
    finally:
        await harness.close()
