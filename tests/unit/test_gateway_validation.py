"""Unit tests of the gateway's declarative validation and URL (SSRF) policy."""

from __future__ import annotations

import ipaddress
import time

import pytest
from google.protobuf import struct_pb2

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor_common.errors import InvalidArgument
from conveyor_gateway.validation import (
    Limits,
    UrlPolicy,
    Validator,
    model_ref_problem,
    resolve_problem,
    url_syntax_problem,
)

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
    s = spec(priority=42, max_attempts=11)
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


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://example.com/", "https"),
        ("https://user:pw@example.com/", "credentials"),
        ("https:///nohost", "no host"),
        ("https://127.0.0.1/", "IP address"),
        ("https://[::1]/", "IP address"),
        ("https://169.254.169.254/latest/meta-data", "IP address"),
        ("https://example.com:99999/", "valid URL"),
        ("javascript://alert(1)", "https"),
    ],
)
def test_url_syntax(url: str, problem: str) -> None:
    found, _, _ = url_syntax_problem(url, UrlPolicy())
    assert found is not None
    assert problem in found


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fc00::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not UrlPolicy().address_allowed(ipaddress.ip_address(address))


def test_public_addresses_and_allow_list() -> None:
    assert UrlPolicy().address_allowed(ipaddress.ip_address("8.8.8.8"))
    assert UrlPolicy().address_allowed(ipaddress.ip_address("2606:4700:4700::1111"))
    policy = UrlPolicy.from_entries(["127.0.0.0/8"])
    assert policy.address_allowed(ipaddress.ip_address("127.0.0.1"))
    assert not policy.address_allowed(ipaddress.ip_address("10.0.0.1"))


async def test_resolution_checks_every_address() -> None:
    # "localhost" resolves to loopback: refused after resolution unless allow-listed.
    assert (
        await resolve_problem("localhost", 443, UrlPolicy()) == "URL points to a non-public address"
    )
    assert await resolve_problem("localhost", 443, UrlPolicy.from_entries(["localhost"])) is None
    assert (
        await resolve_problem("no-such-host.invalid", 443, UrlPolicy())
        == "URL host does not resolve"
    )


async def test_allow_listed_loopback_url_passes() -> None:
    v = Validator(url_policy=UrlPolicy.from_entries(["127.0.0.0/8"], allow_http=True))
    s = spec()
    s.webhook.url = "http://127.0.0.1:8080/hook"
    await v.check(svc_pb2.SubmitTaskRequest(request_id="r", spec=s))


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
