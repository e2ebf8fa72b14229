"""Unit tests of the gateway's declarative validation and URL (SSRF) policy."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from google.protobuf import struct_pb2

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor_common import limits
from conveyor_common.errors import InvalidArgument, Unavailable
from conveyor_common.ssrf import UrlPolicy
from conveyor_gateway.validation import Limits, Validator, model_ref_problem

VERSION = "a" * 64


def spec(**kw: object) -> task_pb2.TaskSpec:
    s = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="acme/sdxl")
    s.input.update({"prompt": "a cat"})
    for key, value in kw.items():
        setattr(s, key, value)
    return s


def fields(exc: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in exc.value.violations]


@pytest.mark.parametrize(
    ("ref", "ok"),
    [
        ("acme/sdxl", True),
        ("acme/sdxl:" + VERSION, True),
        ("acme/sdxl:v1.2", True),
        ("black-forest-labs/flux-1.1-pro", True),
        ("acme", False),
        ("acme/", False),
        ("/sdxl", False),
        ("acme/sdxl/extra", False),
        ("acme/sdxl:", False),
        ("acme/sdxl:" + "g" * 64, False),
        ("acme/sdxl:a:b", False),
        ("acme/sd xl", False),
        ("-acme/sdxl", False),
    ],
)
def test_model_reference_format(ref: str, ok: bool) -> None:
    assert (model_ref_problem(ref) is None) is ok


async def test_valid_submit_passes() -> None:
    await Validator().check(svc_pb2.SubmitTaskRequest(request_id="r-1", spec=spec()))


async def test_every_bad_field_is_named() -> None:
    s = spec(priority=42, max_attempts=limits.MAX_ATTEMPTS_CEILING + 1)
    s.kind = 99  # type: ignore[assignment]
    s.labels["bad key!"] = "v"
    s.run_timeout.FromSeconds(0)
    s.queue_deadline.FromSeconds(int(time.time()) - 10)
    s.webhook.url = "http://example.com/hook"
    s.input.update({"image": "ftp://example.com/x.png"})
    with pytest.raises(InvalidArgument) as exc:
        await Validator().check(svc_pb2.SubmitTaskRequest(request_id="", spec=s))
    assert sorted(fields(exc)) == sorted(
        [
            "request_id",
            "spec.kind",
            "spec.priority",
            "spec.max_attempts",
            'spec.labels["bad key!"]',
            "spec.run_timeout",
            "spec.queue_deadline",
            "spec.webhook.url",
            "spec.input.image",
        ]
    )


async def test_batch_paths_name_the_item() -> None:
    good = svc_pb2.BatchSubmitItem(request_id="a", spec=spec())
    bad = svc_pb2.BatchSubmitItem(request_id="a", spec=spec(model="nope"))
    req = svc_pb2.BatchSubmitTasksRequest(items=[good, good, good, bad])
    with pytest.raises(InvalidArgument) as exc:
        await Validator().check(req)
    assert "items[3].spec.model" in fields(exc)
    assert "items[1].request_id" in fields(exc)  # duplicate key inside the batch


async def test_batch_limits() -> None:
    v = Validator(Limits(max_batch_items=2))
    with pytest.raises(InvalidArgument) as exc:
        await v.check(svc_pb2.BatchSubmitTasksRequest())
    assert fields(exc) == ["items"]
    items = [svc_pb2.BatchSubmitItem(request_id=f"r{i}", spec=spec()) for i in range(3)]
    with pytest.raises(InvalidArgument) as exc:
        await v.check(svc_pb2.BatchSubmitTasksRequest(items=items))
    assert fields(exc) == ["items"]


async def test_input_size_limit() -> None:
    s = spec()
    s.input.update({"prompt": "x" * 2000})
    with pytest.raises(InvalidArgument) as exc:
        await Validator(Limits(max_input_bytes=1000)).check(
            svc_pb2.SubmitTaskRequest(request_id="r", spec=s)
        )
    assert fields(exc) == ["spec.input"]


async def test_nested_urls_in_input_are_found() -> None:
    s = spec()
    nested = struct_pb2.Struct()
    nested.update(
        {"images": [{"url": "https://127.0.0.1/a.png"}], "weird key": "https://10.0.0.1/"}
    )
    s.input.update({"opts": nested})
    with pytest.raises(InvalidArgument) as exc:
        await Validator().check(svc_pb2.SubmitTaskRequest(request_id="r", spec=s))
    assert sorted(fields(exc)) == ["spec.input.opts.images[0].url", 'spec.input.opts["weird key"]']


def webhook_request(url: str) -> svc_pb2.SubmitTaskRequest:
    s = spec()
    s.webhook.url = url
    return svc_pb2.SubmitTaskRequest(request_id="r", spec=s)


async def webhook_problem(url: str, policy: UrlPolicy | None = None) -> str | None:
    violations: list[tuple[str, str]] = []
    try:
        await Validator(url_policy=policy).check(webhook_request(url))
    except InvalidArgument as exc:
        violations = [(v.field, v.description) for v in exc.violations]
    if not violations:
        return None
    assert [field for field, _ in violations] == ["spec.webhook.url"]
    return violations[0][1]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://example.com/", "https"),
        ("https://user:pw@example.com/", "userinfo"),
        ("https:///nohost", "no host"),
        ("https://127.0.0.1/", "loopback"),
        ("https://127.1/", "non-canonical"),
        ("https://2130706433/", "non-canonical"),
        ("https://[::1]/", "loopback"),
        ("https://[::ffff:127.0.0.1]/", "IPv4-mapped"),
        ("https://169.254.169.254/latest/meta-data", "metadata"),
        ("https://10.1.2.3/", "private"),
        ("https://192.168.1.1/", "private"),
        ("https://100.64.0.1/", "carrier-grade NAT"),
        ("https://[fc00::1]/", "unique local"),
        ("https://[fe80::1]/", "link-local"),
        ("https://224.0.0.1/", "multicast"),
        ("https://localhost/", "loopback"),
        ("https://no-such-host.invalid/a", "does not resolve"),
        ("https://example.com:99999/", "does not parse"),
        ("javascript://alert(1)", "https"),
    ],
)
async def test_url_policy_refusals(url: str, problem: str) -> None:
    found = await webhook_problem(url)
    assert found is not None
    assert problem in found


async def test_public_addresses_and_allow_list() -> None:
    assert await webhook_problem("https://8.8.8.8/hook") is None
    assert await webhook_problem("https://[2606:4700:4700::1111]/hook") is None
    loopback = UrlPolicy.from_entries(["127.0.0.0/8"])
    assert await webhook_problem("https://127.0.0.1/hook", loopback) is None
    assert (
        await webhook_problem("http://127.0.0.1:8080/hook", loopback) is None
    )  # http: listed only
    found = await webhook_problem("https://10.0.0.1/hook", loopback)
    assert found is not None
    assert "private" in found
    assert (
        await webhook_problem("https://localhost/hook", UrlPolicy.from_entries(["localhost"]))
        is None
    )


async def test_every_resolved_address_must_be_public() -> None:
    async def split_horizon(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.7"]  # one public, one private answer

    policy = UrlPolicy(resolver=split_horizon)
    found = await webhook_problem("https://rebind.example/hook", policy)
    assert found is not None
    assert "10.0.0.7" in found


async def test_slow_or_failing_dns_is_unavailable_not_a_hang() -> None:
    """A DNS outage is no fault of the request: UNAVAILABLE with RetryInfo, as at the scheduler."""

    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["93.184.216.34"]

    async def try_again(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    for policy, words in (
        (UrlPolicy(dns_timeout=0.05, resolver=slow), "timed out"),
        (UrlPolicy(resolver=try_again), "temporarily"),
    ):
        with pytest.raises(Unavailable) as exc:
            await Validator(url_policy=policy).check(webhook_request("https://slow.example/h"))
        assert words in exc.value.message
        assert exc.value.retry_after_seconds == pytest.approx(5.0)


async def test_bulk_cancel_needs_a_selector() -> None:
    with pytest.raises(InvalidArgument) as exc:
        await Validator().check(
            admin_pb2.BulkCancelTasksRequest(selector=admin_pb2.BulkSelector(limit=5))
        )
    assert fields(exc) == ["selector"]


async def test_list_filter_rules() -> None:
    req = svc_pb2.ListTasksRequest(page_size=501, page_token="x" * 3000)
    req.filter.statuses.append(task_pb2.TASK_STATUS_UNSPECIFIED)
    req.filter.kinds.append(77)  # type: ignore[arg-type]
    req.filter.model = "bad"
    req.filter.created_after.FromSeconds(2000)
    req.filter.created_before.FromSeconds(1000)
    with pytest.raises(InvalidArgument) as exc:
        await Validator().check(req)
    assert sorted(fields(exc)) == sorted(
        [
            "page_size",
            "page_token",
            "filter.statuses[0]",
            "filter.kinds[0]",
            "filter.model",
            "filter.created_after",
        ]
    )
