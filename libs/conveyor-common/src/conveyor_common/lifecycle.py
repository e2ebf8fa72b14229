"""Ordered graceful shutdown on SIGTERM/SIGINT.

``Lifecycle`` collects shutdown steps as components start; on a signal (or ``request_stop()``) it runs
them in the order they were registered for shutdown, each with a timeout, once. The documented order
for a service is: health NOT_SERVING -> keep serving for the readiness period -> stop the gRPC server
with a grace period -> stop consumers (finish in-flight work, commit offsets) -> flush and stop
producers -> close pools/engines -> stop the metrics server.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

Step = Callable[[], Awaitable[None]]

# Shutdown phases: steps run by phase, then by registration order within a phase.
HEALTH_OFF = 10
"""Health NOT_SERVING (readiness probes fail, load balancers stop routing)."""
READINESS_DRAIN = 20
"""Keep serving for the readiness-probe period."""
GRPC_STOP = 30
"""Stop the gRPC server with a grace period for in-flight RPCs."""
CONSUMERS = 40
"""Stop Kafka consumers: finish in-flight records, commit offsets."""
WORKERS = 50
"""Stop background loops (dispatcher, relay, reconciler, delivery workers)."""
PRODUCERS = 60
"""Flush and stop Kafka producers."""
STORAGE = 70
"""Close database engines, HTTP clients and pools."""
METRICS = 80
"""Stop the metrics server (last, so shutdown itself is observable)."""


@dataclass
class _Step:
    name: str
    fn: Step
    timeout: float
    phase: int


@dataclass
class Lifecycle:
    """Signal handling plus an ordered list of shutdown steps."""

    steps: list[_Step] = field(default_factory=list)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    _shutdown_done: bool = False

    def on_shutdown(self, name: str, fn: Step, *, phase: int, timeout: float = 30.0) -> None:
        """Register a shutdown step in a phase (HEALTH_OFF ... METRICS)."""
        self.steps.append(_Step(name, fn, timeout, phase))

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT request a stop (loop.add_signal_handler; must run in the loop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    def request_stop(self) -> None:
        """Ask the service to stop (idempotent)."""
        if not self.stop_event.is_set():
            logger.info("stop requested", extra={"action": "stop_requested"})
            self.stop_event.set()

    async def wait(self) -> None:
        """Wait until a stop was requested."""
        await self.stop_event.wait()

    async def shutdown(self) -> None:
        """Run every step once, in order; a failing or slow step does not block the others."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        for step in sorted(self.steps, key=lambda s: s.phase):
            try:
                await asyncio.wait_for(step.fn(), timeout=step.timeout)
                logger.info(
                    "shutdown step done", extra={"action": "shutdown_step", "step": step.name}
                )
            except Exception:
                logger.exception(
                    "shutdown step failed",
                    extra={"action": "shutdown_step_failed", "step": step.name},
                )
