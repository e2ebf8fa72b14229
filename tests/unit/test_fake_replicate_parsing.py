"""The fake's URL and timestamp helpers (parsed with the standard library, not httpx's URL parser)
keep the answers they gave before, and the fake picks its event loop."""

from __future__ import annotations

import httpx
import pytest
import uvloop

from fake_replicate.__main__ import loop_factory, parse_args
from fake_replicate.model import iso, webhook_params
from fake_replicate.parsing import valid_url

WEBHOOKS = [
    "http://127.0.0.1:8080/hooks?task=abc&attempt=2&x=1",
    "https://h.example/w?a=3&task=t%20x",
    "http://h/w",
    "http://h/w?task=&a=-1",
    "http://h/w?task=a&task=b",
    "http://h/w?attempt=two&task=z",
]


@pytest.mark.parametrize("url", WEBHOOKS)
def test_webhook_params_read_the_query_as_httpx_did(url: str) -> None:
    params, task, attempt = webhook_params(url)
    assert params == dict(httpx.URL(url).params.multi_items())
    assert task == params.get("task")
    raw = params.get("attempt", params.get("a"))
    assert attempt == (int(raw) if raw is not None and raw.lstrip("-").isdigit() else raw)


def test_webhook_params_of_nothing() -> None:
    assert webhook_params(None) == ({}, None, None)
    assert webhook_params("") == ({}, None, None)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://x", True),
        ("https://a.example/c?d=1", True),
        ("http://127.0.0.1:9/none", True),
        ("ftp://x", False),
        ("http://", False),
        ("http:/x", False),
        ("/relative/path", False),
        ("http://x:99999/", False),
        ("http://x:port/", False),
        ("http://exa mple/", False),
        (42, False),
        (None, False),
    ],
)
def test_valid_url(url: object, ok: bool) -> None:
    assert valid_url(url) is ok


def test_iso_is_utc_with_microseconds_and_stable() -> None:
    assert iso(None) is None
    assert iso(0.0) == "1970-01-01T00:00:00.000000Z"
    assert iso(1700000000.123456) == "2023-11-14T22:13:20.123456Z"
    assert iso(1.0000004) == "1970-01-01T00:00:01.000000Z"  # rounded to the microsecond
    assert iso(1.0000006) == "1970-01-01T00:00:01.000001Z"
    assert iso(1700000000.123456) == iso(1700000000.123456)


def test_the_fake_runs_on_uvloop_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["--token", "t", "--webhook-secret", "whsec_" + "QUJD" * 8]
    args, _ = parse_args(base)
    assert args.event_loop == "uvloop"
    factory = loop_factory(args.event_loop)
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    monkeypatch.setenv("FAKE_REPLICATE_EVENT_LOOP", "asyncio")
    args, _ = parse_args(base)
    assert args.event_loop == "asyncio"
    assert loop_factory(args.event_loop) is None
    with pytest.raises(SystemExit):
        parse_args([*base, "--event-loop", "trio"])
