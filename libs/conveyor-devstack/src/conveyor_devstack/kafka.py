"""Apache Kafka 4.x (KRaft, one combined broker+controller node) for tests, ``make run``, benchmarks.

The jars come from Maven Central: ``devstack/kafka/pom.xml`` is resolved once with
``mvn dependency:copy-dependencies`` into ``<cache>/kafka-<version>/libs`` (cache:
``CONVEYOR_DEVSTACK_CACHE``, default ``<repo>/.cache/devstack``). ``LocalKafka`` formats storage with
``kafka.tools.StorageTool`` in an instance directory and runs ``kafka.Kafka`` on the machine's Java 17
on two free loopback ports (client and controller), with settings that keep tests fast and a log4j2
config that writes WARN (and the "started" line) to ``logs/server.log``.

``LocalKafka(security="SASL_SSL")`` serves its client listener as SASL_SSL instead of PLAINTEXT: a
throwaway CA and broker certificate (``conveyor_devstack.tls``) and SCRAM-SHA-512 users created at
format time (``kafka-storage format --add-scram``): ``broker`` for the broker's own inter-broker
connections and ``conveyor`` for clients, with passwords generated at every start.
``client_security`` is what clients connect with (the password is also in ``password_file``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Literal

from conveyor_common.kafka.security import PLAINTEXT, KafkaSecurity
from conveyor_devstack import _process
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka_install import (
    _cluster_id,
    broker_answers,
    fetch_kafka,
    find_java,
    kafka_version,
    run_coroutine_sync,
)

log = logging.getLogger(__name__)

KafkaStopMode = Literal["graceful", "kill"]
ListenerSecurity = Literal["PLAINTEXT", "SASL_SSL"]
"""What the devstack's client listener speaks."""
LISTENER_SECURITY: tuple[ListenerSecurity, ...] = ("PLAINTEXT", "SASL_SSL")
SCRAM_MECHANISM: Final = "SCRAM-SHA-512"
CLIENT_USER = "conveyor"
"""The SCRAM user clients of a SASL_SSL devstack broker authenticate as."""
BROKER_USER = "broker"

JVM_OPTIONS: tuple[str, ...] = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-XX:TieredStopAtLevel=1",
)
"""``TieredStopAtLevel=1``: the client compiler only. A devstack broker lives for minutes (a test
run, a benchmark), and the server compiler was still compiling through them: 43% of the broker's CPU
in the pipeline benchmark's window went to its compiler threads, measured per thread. With C1 alone
the broker's CPU there fell by 40% (its request handlers run ~20% slower code), and it starts
sooner. A long-lived broker (``deploy/``, managed Kafka) keeps the JVM's default."""

BROKER_SETTINGS: Mapping[str, str] = {
    "num.partitions": "3",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    "auto.create.topics.enable": "false",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "5",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "5",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    # Consumers of a lost replica's partitions resume within seconds (services ask for 3 s).
    "group.min.session.timeout.ms": "1000",
    # After a SIGKILL the restarted node waits for its old broker session to expire before it is
    # unfenced: 9 s by default, ~3 s here (restart after kill measured 12.4 s -> ~4 s).
    "broker.session.timeout.ms": "3000",
    "broker.heartbeat.interval.ms": "500",
    "num.network.threads": "2",
    "num.io.threads": "4",
    "num.recovery.threads.per.data.dir": "1",
    "log.retention.hours": "24",
}
"""Single-node settings that keep tests fast (no rebalance delay, small internal topics)."""

_LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="warn">
  <Appenders>
    <File name="file" fileName="{log_file}">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka.server.KafkaRaftServer" level="info"/>
    <Root level="warn"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""


# --------------------------------------------------------------------------------------------------
# Jars


# --------------------------------------------------------------------------------------------------
# Broker


class LocalKafka:
    """A single-node KRaft Kafka in a temporary directory, run as a child JVM.

    Lifecycle: ``prepare()`` (jars, config, storage format; any thread) -> ``spawn()`` (from a
    long-lived thread) -> ``wait_ready()`` / ``await wait_ready_async()``; or just ``start()``.
    ``stop(mode)`` and ``start()`` again keep the ports and the data. ``close()`` deletes everything.
    """

    def __init__(
        self,
        *,
        settings: Mapping[str, str] | None = None,
        ready_timeout: float = 90.0,
        security: ListenerSecurity = "PLAINTEXT",
    ) -> None:
        if security not in LISTENER_SECURITY:
            raise DevstackError(
                f"the devstack's Kafka listener is one of {', '.join(LISTENER_SECURITY)}, "
                f"not {security!r}"
            )
        self.settings = dict(settings or {})
        self.ready_timeout = ready_timeout
        self.security: ListenerSecurity = security
        self.client_security: KafkaSecurity = PLAINTEXT
        """How clients connect (SASL_SSL: user, password and CA file; set by ``prepare``)."""
        self.password_file: Path | None = None
        """SASL_SSL: a file holding the client user's password."""
        self._broker_password = ""
        self.version: str | None = None
        self.port: int | None = None
        self.controller_port: int | None = None
        self.root: Path | None = None
        self._java: str | None = None
        self._libs: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    @property
    def _root(self) -> Path:
        if self.root is None:
            raise DevstackError("LocalKafka.prepare() has not run")
        return self.root

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def server_log(self) -> Path:
        """The broker's log4j2 log (WARN and the "started" line)."""
        return self._root / "logs" / "server.log"

    @property
    def stdout_log(self) -> Path:
        """The JVM's stdout and stderr."""
        return self._root / "kafka.out"

    @property
    def running(self) -> bool:
        """Whether the JVM is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _properties(self) -> dict[str, str]:
        if self.security == "SASL_SSL":
            return self._sasl_ssl_properties()
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self._root / "data"),
        }
        props.update(BROKER_SETTINGS)
        props.update(self.settings)
        return props

    def _sasl_ssl_properties(self) -> dict[str, str]:
        tls = self._root / "tls"
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{BROKER_USER}" password="{self._broker_password}";'
        )
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"SASL_SSL://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "SASL_SSL",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
            f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": jaas,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(tls / "broker-bundle.pem"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(tls / "ca.pem"),
            "ssl.client.auth": "none",
            "log.dirs": str(self._root / "data"),
        }
        props.update(BROKER_SETTINGS)
        props.update(self.settings)
        return props

    def _prepare_sasl_ssl(self) -> list[str]:
        """CA, broker certificate, SCRAM passwords; the ``--add-scram`` arguments of the format."""
        from conveyor_devstack.tls import ThrowawayCA

        tls = self._root / "tls"
        ca = ThrowawayCA(tls)
        ca.issue("broker")
        self._broker_password = secrets.token_hex(16)
        client_password = secrets.token_hex(16)
        self.password_file = tls / "client.password"
        self.password_file.write_text(client_password + "\n")
        os.chmod(self.password_file, 0o600)
        self.client_security = KafkaSecurity(
            protocol="SASL_SSL",
            sasl_mechanism=SCRAM_MECHANISM,
            sasl_username=CLIENT_USER,
            sasl_password=client_password,
            ssl_cafile=str(ca.cafile),
        )
        args: list[str] = []
        for user, password in (
            (BROKER_USER, self._broker_password),
            (CLIENT_USER, client_password),
        ):
            args += ["--add-scram", f"{SCRAM_MECHANISM}=[name={user},password={password}]"]
        return args

    def _java_argv(self, main: str, *args: str) -> list[str]:
        if self._java is None or self._libs is None:
            raise DevstackError("LocalKafka.prepare() has not run")
        return [
            self._java,
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={self._root / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={self._root / 'logs'}",
            "-cp",
            f"{self._libs}/*",
            main,
            *args,
        ]

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LC_ALL": "C.UTF-8",
            "TZ": "UTC",
        }

    def _write_properties(self) -> None:
        props = "".join(f"{key}={value}\n" for key, value in self._properties().items())
        (self._root / "server.properties").write_text(props)

    def prepare(self) -> None:
        """Find java, fetch the jars (cached), write the config, format the storage."""
        started = time.monotonic()
        self._java = find_java()
        self._libs = fetch_kafka()
        self.version = kafka_version()
        self.root = _process.instance_dir("kafka")
        self.port, self.controller_port = _process.free_ports(2)
        (self.root / "logs").mkdir()
        (self.root / "log4j2.xml").write_text(_LOG4J2_XML.format(log_file=self.server_log))
        scram = self._prepare_sasl_ssl() if self.security == "SASL_SSL" else []
        self._write_properties()
        _process.run(
            self._java_argv(
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={_cluster_id()}",
                "--config",
                str(self.root / "server.properties"),
                *scram,
            ),
            what="kafka StorageTool format",
            cwd=self.root,
            env=self._env(),
            timeout=120,
        )
        log.info(
            "devstack: Kafka %s storage formatted in %s (%.1fs)",
            self.version,
            self.root,
            time.monotonic() - started,
        )

    def spawn(self) -> None:
        """Start the broker JVM (call from a long-lived thread, see ``_process``)."""
        if self.running:
            return
        self._proc = _process.spawn(
            self._java_argv("kafka.Kafka", str(self._root / "server.properties")),
            log_path=self.stdout_log,
            cwd=self._root,
            env=self._env(),
        )
        _REGISTRY.add(self)

    def _not_ready(self, why: str) -> DevstackError:
        return DevstackError(
            f"Kafka broker on {self.bootstrap} {why}; {self.server_log}:\n"
            f"{_process.tail_file(self.server_log)}\n  {self.stdout_log}:\n"
            f"{_process.tail_file(self.stdout_log, 20)}"
        )

    def _check_alive(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise self._not_ready(f"exited (code {code}) before it was ready")
        try:
            clash = _process.PORT_CLASH in self.server_log.read_text(errors="replace")
        except OSError:
            clash = False
        if clash:  # the JVM takes seconds to give up; no need to wait for it
            raise self._not_ready("could not bind its ports")

    async def wait_ready_async(self) -> None:
        """Wait until the broker listens and its metadata lists itself (a clear error otherwise)."""
        assert self.port is not None
        deadline = _process.monotonic_deadline(self.ready_timeout)
        last_error = "no answer"
        while True:
            self._check_alive()
            if _process.port_open(self.port):
                try:
                    if await broker_answers(
                        self.bootstrap, request_timeout_ms=3000, security=self.client_security
                    ):
                        return
                    last_error = "metadata lists no broker yet"
                except Exception as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise self._not_ready(
                    f"was not ready within {self.ready_timeout:.0f}s (last: {last_error})"
                )
            await asyncio.sleep(0.1)

    def wait_ready(self) -> None:
        """``wait_ready_async`` for synchronous callers (runs on a private loop in a thread)."""
        run_coroutine_sync(self.wait_ready_async)

    def _first_start_clash(self, exc: BaseException, attempt: int) -> bool:
        """On the first start only, move to other ports when ours were taken meanwhile.

        The storage does not record the ports (static quorum), so rewriting the config is enough.
        """
        if self._started_once or not _process.port_clash(exc):
            return False
        if attempt + 1 >= _process.FIRST_START_ATTEMPTS:
            return False
        self.stop("kill")
        for log_file in (self.server_log, self.stdout_log):
            _process.set_aside(log_file)
        self.port, self.controller_port = _process.free_ports(2)
        self._write_properties()
        log.warning("devstack: kafka ports were taken meanwhile; using %s", self.bootstrap)
        return True

    def start(self) -> None:
        """Prepare (first time only), spawn and wait until ready; restarts keep the ports."""
        if self.root is None:
            self.prepare()
        for attempt in range(_process.FIRST_START_ATTEMPTS):
            self.spawn()
            try:
                self.wait_ready()
            except DevstackError as exc:
                if not self._first_start_clash(exc, attempt):
                    raise
            else:
                self._started_once = True
                return

    async def start_async(self) -> None:
        """``start`` for async callers: blocking steps in threads, the spawn in the loop thread."""
        if self.root is None:
            await asyncio.to_thread(self.prepare)
        for attempt in range(_process.FIRST_START_ATTEMPTS):
            self.spawn()
            try:
                await self.wait_ready_async()
            except DevstackError as exc:
                if not self._first_start_clash(exc, attempt):
                    raise
            else:
                self._started_once = True
                return

    def stop(self, mode: KafkaStopMode = "graceful") -> None:
        """Stop the broker: ``graceful`` (SIGTERM, controlled shutdown) or ``kill`` (SIGKILL)."""
        proc = self._proc
        if proc is None:
            return
        sig = signal.SIGTERM if mode == "graceful" else signal.SIGKILL
        _process.stop_process(proc, sig, timeout=30, what="kafka")
        self._proc = None

    def close(self) -> None:
        """Stop the broker and delete its directory."""
        self.stop("graceful")
        _REGISTRY.discard(self)
        if self.root is not None:
            _process.remove_instance_dir(self.root)
            self.root = None


class KafkaServer(_process.ServerHandle["LocalKafka", KafkaStopMode]):
    """A reachable Kafka broker, whatever started it.

    ``backend`` is ``env``, ``testcontainers`` or ``local-process``; ``stop``/``start`` work only for
    ``local-process`` (``can_restart``).
    """

    kind = "Kafka"

    def __init__(
        self,
        *,
        bootstrap: str,
        backend: str,
        version: str,
        local: LocalKafka | None = None,
        closer: Callable[[], None] | None = None,
        security: KafkaSecurity = PLAINTEXT,
        password_file: Path | None = None,
    ) -> None:
        super().__init__(backend, local, closer)
        self.bootstrap = bootstrap
        self.version = version
        self.security = security
        """How clients connect (PLAINTEXT, or SASL_SSL with the devstack's user and CA)."""
        self.password_file = password_file
        """SASL: a file holding ``security``'s password (services read it, not an env var)."""

    def __repr__(self) -> str:
        return (
            f"KafkaServer(backend={self.backend!r}, bootstrap={self.bootstrap!r}, "
            f"security={self.security.protocol!r})"
        )

    @property
    def label(self) -> str:
        """``local-process(4.1.1)``: what the test summary prints."""
        return f"{self.backend}({self.version})"

    def stop(self, mode: KafkaStopMode = "graceful") -> None:
        """Stop the broker (``graceful`` or ``kill``); local only."""
        self._stop(mode)

    async def stop_async(self, mode: KafkaStopMode = "graceful") -> None:
        """``stop`` without blocking the event loop."""
        await self._stop_async(mode)


_REGISTRY: set[LocalKafka] = set()


def close_all() -> None:
    """Stop every local broker still running (registered with atexit by the package)."""
    for local in list(_REGISTRY):
        local.close()
