"""Authentication and tenancy through the gateway and the real scheduler on PostgreSQL.

Every auth failure mode answers UNAUTHENTICATED; admin calls need the admin role; another tenant's task
answers exactly like a missing one (same code, same message) for get, cancel, watch and list.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import admin_service_pb2_grpc as admin_grpc
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_client import ConveyorError
from conveyor_testkit.stack import Stack, start_stack
from conveyor_testkit.tokens import AUDIENCE, ISSUER, Keys, metadata

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture(scope="module")
async def stack(database_url: str) -> AsyncIterator[Stack]:
    s = await start_stack(database_url)
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture(scope="module")
async def channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(stack.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def tasks(channel: grpc.aio.Channel) -> Any:
    return svc_grpc.TaskServiceStub(channel)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**kw: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "s", "tenant_id": "t1", "exp": now + 600}
    claims.update(kw)
    return claims


def alg_none_token(keys: Keys) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(_claims()).encode())}."


def hs256_with_rsa_public_key(keys: Keys) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    sig = hmac.new(keys.rsa_public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(sig)}"


BAD_TOKENS: dict[str, Callable[[Keys], tuple[tuple[str, str], ...]]] = {
    "missing": lambda k: (),
    "not_bearer": lambda k: (("authorization", "Basic dXNlcjpwdw=="),),
    "garbage": lambda k: metadata("not.a.jwt"),
    "expired": lambda k: metadata(k.token(ttl=-120)),
    "wrong_audience": lambda k: metadata(k.token(audience="another-service")),
    "wrong_issuer": lambda k: metadata(k.token(issuer="evil-issuer")),
    "bad_signature_hs256": lambda k: metadata(k.token(key=b"x" * 48)),
    "bad_signature_rs256": lambda k: metadata(
        k.token(alg="RS256", key=Keys.generate().rsa_private_pem)
    ),
    "alg_none": lambda k: metadata(alg_none_token(k)),
    "hs256_signed_with_rs256_public_key": lambda k: metadata(hs256_with_rsa_public_key(k)),
    "no_tenant_claim": lambda k: metadata(k.token(drop=("tenant_id",))),
    # Token policy: numeric exp and iat, lifetime at most GATEWAY_JWT_MAX_LIFETIME_SECONDS (24 h).
    "exp_string": lambda k: metadata(k.token(extra={"exp": str(int(time.time()) + 600)})),
    "exp_float_huge": lambda k: metadata(k.token(extra={"exp": 1e30})),
    "exp_bool": lambda k: metadata(k.token(extra={"exp": True})),
    "no_iat": lambda k: metadata(k.token(drop=("iat",))),
    "iat_string": lambda k: metadata(k.token(extra={"iat": str(int(time.time()))})),
    "lifetime_over_a_day": lambda k: metadata(k.token(ttl=24 * 3600 + 60)),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_credentials_are_unauthenticated(stack: Stack, tasks: Any, case: str) -> None:
    before = await stack.count_tasks()
    req = svc_pb2.SubmitTaskRequest(
        request_id=str(uuid.uuid4()),
        spec=task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="acme/sdxl"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await tasks.SubmitTask(req, metadata=BAD_TOKENS[case](stack.keys), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    err = ConveyorError.from_rpc_error(exc.value)
    assert err.reason == "UNAUTHENTICATED"
    assert await stack.count_tasks() == before


async def test_both_key_types_authenticate(stack: Stack, tasks: Any) -> None:
    for alg in ("HS256", "RS256"):
        resp = await tasks.GetQueueStats(
            svc_pb2.GetQueueStatsRequest(), metadata=metadata(stack.keys.token(alg=alg)), timeout=5
        )
        assert resp.HasField("computed_at")


async def test_admin_role_required(stack: Stack, channel: grpc.aio.Channel) -> None:
    admin: Any = admin_grpc.AdminServiceStub(channel)
    req = admin_pb2.GetTenantRequest(tenant_id="t1")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await admin.GetTenant(req, metadata=metadata(stack.keys.token("t1")), timeout=5)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    ops = metadata(stack.keys.token("ops", role="admin"))
    await admin.UpsertTenant(
        admin_pb2.UpsertTenantRequest(tenant_id="t1", tier=task_pb2.TIER_PRO),
        metadata=ops,
        timeout=5,
    )
    resp = await admin.GetTenant(req, metadata=ops, timeout=5)
    assert resp.tenant.tenant_id == "t1"
    assert resp.tenant.tier == task_pb2.TIER_PRO


async def _submit(tasks: Any, md: Any) -> task_pb2.Task:
    spec = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_TEXT, model="acme/llm")
    spec.input.update({"prompt": "hello"})
    resp = await tasks.SubmitTask(
        svc_pb2.SubmitTaskRequest(request_id=str(uuid.uuid4()), spec=spec), metadata=md, timeout=5
    )
    task: task_pb2.Task = resp.task
    return task


async def _error(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value.code(), exc.value.details() or ""


async def test_cross_tenant_access_is_indistinguishable_from_missing(
    stack: Stack, tasks: Any
) -> None:
    owner = metadata(stack.keys.token("owner-tenant"))
    intruder = metadata(stack.keys.token("intruder-tenant"))
    task = await _submit(tasks, owner)
    missing = str(uuid.uuid4())

    async def watch(task_id: str) -> None:
        call = tasks.WatchTask(
            svc_pb2.WatchTaskRequest(task_id=task_id), metadata=intruder, timeout=5
        )
        async for _ in call:
            pass

    def calls(task_id: str) -> dict[str, Any]:
        return {
            "get": tasks.GetTask(
                svc_pb2.GetTaskRequest(task_id=task_id), metadata=intruder, timeout=5
            ),
            "cancel": tasks.CancelTask(
                svc_pb2.CancelTaskRequest(task_id=task_id, request_id=str(uuid.uuid4())),
                metadata=intruder,
                timeout=5,
            ),
            "watch": watch(task_id),
        }

    for name in ("get", "cancel", "watch"):
        code_other, msg_other = await _error(calls(task.task_id)[name])
        code_missing, msg_missing = await _error(calls(missing)[name])
        assert code_other == code_missing == grpc.StatusCode.NOT_FOUND, name
        assert msg_other.replace(task.task_id, "<id>") == msg_missing.replace(missing, "<id>"), name

    # The intruder's list does not show it; the owner's does; the task is untouched.
    listed = await tasks.ListTasks(svc_pb2.ListTasksRequest(), metadata=intruder, timeout=5)
    assert task.task_id not in {t.task_id for t in listed.tasks}
    mine = await tasks.ListTasks(svc_pb2.ListTasksRequest(), metadata=owner, timeout=5)
    assert task.task_id in {t.task_id for t in mine.tasks}
    got = await tasks.GetTask(
        svc_pb2.GetTaskRequest(task_id=task.task_id), metadata=owner, timeout=5
    )
    assert got.task.status in (task_pb2.TASK_STATUS_QUEUED, task_pb2.TASK_STATUS_DISPATCHED)


async def test_watch_through_the_real_scheduler_ends_at_cancel(stack: Stack, tasks: Any) -> None:
    md = metadata(stack.keys.token("watcher"))
    task = await _submit(tasks, md)
    call = tasks.WatchTask(svc_pb2.WatchTaskRequest(task_id=task.task_id), metadata=md, timeout=20)
    first = await call.read()
    assert first.event.sequence == 1
    assert first.event.type == task_pb2.TASK_EVENT_TYPE_SUBMITTED
    await tasks.CancelTask(
        svc_pb2.CancelTaskRequest(task_id=task.task_id, request_id=str(uuid.uuid4())),
        metadata=md,
        timeout=5,
    )
    rest: list[task_pb2.TaskEvent] = []
    while True:
        msg = await call.read()
        if msg is grpc.aio.EOF:
            break
        rest.append(msg.event)
    assert rest[-1].type == task_pb2.TASK_EVENT_TYPE_CANCELED
    assert [e.sequence for e in [first.event, *rest]] == list(range(1, len(rest) + 2))


async def test_tenant_comes_from_the_token_only(stack: Stack, tasks: Any) -> None:
    task = await _submit(tasks, metadata(stack.keys.token("token-tenant", tier="pro")))
    assert task.tenant_id == "token-tenant"


async def test_queue_statistics_are_the_callers_own(stack: Stack, tasks: Any) -> None:
    """Tenant B sees nothing of tenant A's private models, not even naming one as a filter; the
    admin role sees everyone's."""
    owner = metadata(stack.keys.token("stats-a"))
    other = metadata(stack.keys.token("stats-b"))
    admin = metadata(stack.keys.token("ops", role="admin"))
    spec = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="stats-a/private-model")
    spec.input.update({"prompt": "secret"})
    for _ in range(3):
        await tasks.SubmitTask(
            svc_pb2.SubmitTaskRequest(request_id=str(uuid.uuid4()), spec=spec),
            metadata=owner,
            timeout=5,
        )

    async def models(md: Any, model: str = "") -> dict[str, int]:
        resp = await tasks.GetQueueStats(
            svc_pb2.GetQueueStatsRequest(model=model), metadata=md, timeout=5
        )
        return {s.model: s.waiting + s.active + s.succeeded for s in resp.stats if s.model}

    assert (await models(owner)).get("stats-a/private-model") == 3
    assert "stats-a/private-model" not in await models(other)
    assert await models(other, "stats-a/private-model") == {}
    assert (await models(admin)).get("stats-a/private-model") == 3
