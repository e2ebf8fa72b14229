"""Session fixtures shared by every test in the repository.

The PostgreSQL and Kafka fixtures live in ``conveyor_devstack.pytest_plugin`` (loaded through the
``pytest11`` entry point of conveyor-devstack, so ``services/*/tests`` get them too):

* ``devstack_postgres``: the session's PostgreSQL 15 (``.url``, ``create_database``, ``stop``/``start``)
* ``database_url``: a fresh, empty database per test module (a libpq URL)
* ``devstack_kafka`` / ``kafka_bootstrap``: the session's Apache Kafka 4.x bootstrap ``host:port``
* ``devstack_kafka_server``: the broker handle (``stop``/``start`` for restart tests)
* ``conveyor_kafka_topics``: Conveyor's topics created; ``make_topic(partitions)``: a fresh topic

They start lazily and FAIL (not skip) when a backend cannot start, unless CONVEYOR_ALLOW_SKIP=1.
The backends come from CONVEYOR_TEST_DATABASE_URL / CONVEYOR_TEST_KAFKA_BOOTSTRAP, else
testcontainers, else local processes; the run ends with a ``devstack: postgres=... kafka=...`` line.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Plugin autoloading can be turned off (PYTEST_DISABLE_PLUGIN_AUTOLOAD=1): load it by hand.
    if not config.pluginmanager.has_plugin("conveyor_devstack"):
        config.pluginmanager.import_plugin("conveyor_devstack.pytest_plugin")
    # Fixtures shared by the scheduler's integration test modules.
    config.pluginmanager.import_plugin("tests.integration.scheduler_env")
    config.pluginmanager.import_plugin("tests.integration.adapter_env")
