"""SSRF: a corpus of hostile callback URLs is refused at registration (the scheduler's
CreateWebhookEndpoint, real PostgreSQL) and again at connect time (the notifier's pinned client), and
a canary server on loopback is never reached. A name that rebinds from a public address at
registration to 127.0.0.1 at send time is refused end to end (real Kafka, real notifier).

Safety net: every egress connection in these tests goes through ``LoopbackOnly``, which refuses and
records any connection to a non-loopback address, so a broken policy can never send traffic off
the machine.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import httpcore
import pytest
from aiohttp import web
from grpc_status import rpc_status

from conveyor.scheduler.v1 import scheduler_service_pb2 as spb
from conveyor.tasks.v1 import task_pb2, webhook_service_pb2
from conveyor_common.errors import unpack_details
from conveyor_common.ssrf import AllowList, system_resolver
from conveyor_common.standard_webhooks import generate_secret, sign_headers
from conveyor_notifier.app import Notifier
from conveyor_notifier.egress import WebhookSender, webhook_client
from tests.integration.notifier_support import (
    Canary,
    SchedulerSide,
    create_endpoint,
    eventually_async,
    list_deliveries,
    make_event,
    make_topics,
    notifier_settings,
    principal,
    publish,
    receiver,
    start_producer,
    start_scheduler_side,
)

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

PUBLIC = "93.184.216.34"
"""A public address the test resolver hands out; never connected to (LoopbackOnly refuses it)."""


class LoopbackOnly(httpcore.AsyncNetworkBackend):
    """Inner backend of the pinned client: connects to loopback only, records everything else."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.connected: list[str] = []
        self.blocked: list[str] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if not ipaddress.ip_address(host).is_loopback:
            self.blocked.append(host)
            raise httpcore.ConnectError(f"test guard: {host} is not loopback")
        self.connected.append(f"{host}:{port}")
        return await self.inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("test guard: no unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def rebinding_resolver(rebind_to: str) -> Any:
    """Names under ``.rebind.test`` resolve as the test says; others through the system."""

    async def resolve(host: str, port: int) -> Sequence[str]:
        if host == "internal.rebind.test":
            return ["127.0.0.1"]
        if host == "mixed.rebind.test":
            return [PUBLIC, "10.0.0.1"]
        if host == "hook.rebind.test":
            return [rebind_to]
        return await system_resolver(host, port)

    return resolve


def corpus(p: int) -> list[str]:
    """Hostile URLs; ``p`` is the canary's port, so a URL that got through would hit it."""
    return [
        # loopback in every spelling
        f"https://127.0.0.1:{p}/hook",
        f"https://127.1:{p}/hook",
        f"https://0x7f000001:{p}/hook",
        f"https://2130706433:{p}/hook",
        f"https://017700000001:{p}/hook",
        f"https://0177.0.0.1:{p}/hook",
        f"https://127.0.0.2:{p}/hook",
        f"https://localhost:{p}/hook",
        f"https://LOCALHOST.:{p}/hook",
        f"https://[::1]:{p}/hook",
        f"https://[::ffff:127.0.0.1]:{p}/hook",
        f"https://[0:0:0:0:0:ffff:7f00:1]:{p}/hook",
        f"https://[::127.0.0.1]:{p}/hook",
        f"https://0.0.0.0:{p}/hook",
        f"https://0:{p}/hook",
        f"https://[::]:{p}/hook",
        # private, link-local, metadata, CGNAT, multicast, broadcast
        "https://10.0.0.1/hook",
        "https://172.16.5.4/hook",
        "https://192.168.1.1/hook",
        "https://100.64.0.1/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::ffff:169.254.169.254]/latest/meta-data/",
        "https://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
        "https://[fd00:ec2::254]/latest/meta-data/",
        "https://[fe80::1]/hook",
        "https://[fc00::1]/hook",
        "https://224.0.0.1/hook",
        "https://255.255.255.255/hook",
        # userinfo and parser tricks
        f"https://good@127.0.0.1:{p}/hook",
        f"https://user:pass@example.com@127.0.0.1:{p}/hook",
        f"https://example.com\\@127.0.0.1:{p}/hook",
        f"https://[::1%25lo]:{p}/hook",
        f" https://127.0.0.1:{p}/hook",
        f"https://127.0.0.1:{p}/ho ok",
        # schemes
        f"http://127.0.0.1:{p}/hook",
        f"ftp://127.0.0.1:{p}/hook",
        "file:///etc/passwd",
        f"gopher://127.0.0.1:{p}/_GET",
        f"ws://127.0.0.1:{p}/hook",
        # names that resolve to private addresses
        f"https://internal.rebind.test:{p}/hook",
        f"https://mixed.rebind.test:{p}/hook",
    ]


@pytest.fixture(scope="module")
async def canary() -> AsyncIterator[Canary]:
    c = await Canary().start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture(scope="module")
async def side(database_url: str) -> AsyncIterator[SchedulerSide]:
    """The scheduler's webhook side with an EMPTY allow-list (the production policy)."""
    s = await start_scheduler_side(
        database_url, allow_hosts=[], resolver=rebinding_resolver(PUBLIC)
    )
    try:
        yield s
    finally:
        await s.close()


async def registration_outcome(
    side: SchedulerSide, request: spb.SchedulerServiceCreateWebhookEndpointRequest
) -> tuple[str, list[str]]:
    """(status code name, BadRequest fields) of a CreateWebhookEndpoint call."""
    try:
        await side.scheduler.CreateWebhookEndpoint(request)
    except grpc.aio.AioRpcError as exc:
        status = rpc_status.from_call(exc)
        details = unpack_details(status) if status is not None else {}
        bad: Any = details.get("BadRequest")
        return exc.code().name, [v.field for v in bad.field_violations] if bad else []
    return "OK", []


async def test_corpus_is_refused_at_registration(side: SchedulerSide, canary: Canary) -> None:
    urls = corpus(canary.port)
    assert len(urls) >= 30
    t = f"tenant-{uuid.uuid4().hex[:8]}"
    outcomes: dict[str, tuple[str, list[str]]] = {}
    for url in urls:
        request = spb.SchedulerServiceCreateWebhookEndpointRequest(
            principal=principal(t),
            request=webhook_service_pb2.CreateWebhookEndpointRequest(url=url),
        )
        outcomes[url] = await registration_outcome(side, request)
    assert {u: o for u, o in outcomes.items() if o != ("INVALID_ARGUMENT", ["url"])} == {}
    listed = await side.scheduler.ListWebhookEndpoints(
        spb.SchedulerServiceListWebhookEndpointsRequest(principal=principal(t))
    )
    assert list(listed.response.endpoints) == []
    assert canary.connections == 0


async def test_corpus_is_refused_at_connect_time(canary: Canary) -> None:
    guard = LoopbackOnly()
    client = webhook_client(AllowList(), resolver=rebinding_resolver(PUBLIC), inner_backend=guard)
    sender = WebhookSender(client, timeout_s=5, max_response_bytes=1024)
    body = b'{"type":"task.succeeded"}'
    headers = sign_headers([generate_secret()], body)
    try:
        results = {url: await sender.post(url, body, headers) for url in corpus(canary.port)}
    finally:
        await client.aclose()
    not_refused = {u: r for u, r in results.items() if not r.refused}
    assert not_refused == {}
    assert all(not r.delivered and r.status_code == 0 for r in results.values())
    assert canary.connections == 0
    assert guard.connected == []
    assert guard.blocked == []

    # Positive controls: the same machinery does connect when the allow-list says so, and the
    # canary does count connections.
    allowed = webhook_client(AllowList.parse(["127.0.0.1"]), inner_backend=guard)
    try:
        result = await WebhookSender(allowed, timeout_s=5, max_response_bytes=1024).post(
            f"http://127.0.0.1:{canary.port}/hook", body, headers
        )
    finally:
        await allowed.aclose()
    assert result.delivered
    assert canary.connections == 1
    canary.connections = 0


async def test_redirects_are_not_followed(canary: Canary) -> None:
    async def redirect(rec: Any, request: web.Request, body: bytes) -> web.StreamResponse:
        raise web.HTTPFound(f"http://127.0.0.1:{canary.port}/stolen")

    guard = LoopbackOnly()
    async with receiver(responder=redirect) as rec:
        client = webhook_client(AllowList.parse(["127.0.0.1"]), inner_backend=guard)
        try:
            result = await WebhookSender(client, timeout_s=5, max_response_bytes=1024).post(
                rec.url + "/hook", b"{}", sign_headers([generate_secret()], b"{}")
            )
        finally:
            await client.aclose()
    assert result.status_code == 302
    assert not result.delivered
    assert "redirect" in result.error
    assert guard.connected == [f"127.0.0.1:{rec.port}"]
    assert canary.connections == 0


async def test_dns_rebinding_to_loopback_is_refused_when_sending(
    side: SchedulerSide, canary: Canary, kafka_bootstrap: str
) -> None:
    """Registered while the name resolved to a public address; at send time it resolves to
    127.0.0.1: the notifier refuses to connect, logs the refusal and never reaches the canary."""
    t = f"tenant-{uuid.uuid4().hex[:8]}"
    created = await create_endpoint(
        side,
        t,
        f"https://hook.rebind.test:{canary.port}/hook",
        [task_pb2.TASK_EVENT_TYPE_SUCCEEDED],
    )
    assert created.endpoint.enabled
    topics = await make_topics(kafka_bootstrap, "notifier-ssrf")
    guard = LoopbackOnly()
    settings = notifier_settings(
        kafka_bootstrap,
        side.address,
        topics,
        webhook_allow_hosts=[],
        retry_base_seconds=30,
        retry_max_seconds=60,
    )
    notifier = Notifier(settings, resolver=rebinding_resolver("127.0.0.1"), egress_backend=guard)
    await notifier.start(serve_metrics=False)
    producer = await start_producer(kafka_bootstrap)
    try:
        task_id = str(uuid.uuid4())
        await publish(
            producer,
            topics["events"],
            [make_event(t, task_id, 1, task_pb2.TASK_EVENT_TYPE_SUCCEEDED)],
        )

        async def attempted() -> bool:
            log = await list_deliveries(side, t, task_id)
            return bool(log) and log[0].attempts >= 1

        await eventually_async(attempted, what="a delivery attempt")
        (delivery,) = await list_deliveries(side, t, task_id)
        assert delivery.state == webhook_service_pb2.DELIVERY_STATE_PENDING  # retried later
        assert delivery.last_status_code == 0
        assert "refused" in delivery.last_error
        assert "127.0.0.1" in delivery.last_error
        refused = notifier.registry.get_sample_value(
            "conveyor_notifier_deliveries_total", {"outcome": "refused"}
        )
        assert refused == 1.0
    finally:
        await producer.stop()
        await notifier.stop()
    assert canary.connections == 0
    assert guard.connected == []
    assert guard.blocked == []
