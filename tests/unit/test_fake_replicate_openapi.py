"""The OpenAPI checker used on recorded exchanges finds what Replicate's document forbids."""

from __future__ import annotations

import json
from typing import Any

from fake_replicate.openapi import Exchange, OpenApiChecker

PREDICTION: dict[str, Any] = {
    "id": "p1",
    "model": "acme/flux",
    "version": "hidden",
    "input": {"prompt": "x"},
    "output": None,
    "data_removed": False,
    "error": None,
    "status": "starting",
    "created_at": "2026-01-01T00:00:00.000000Z",
    "urls": {
        "get": "https://api.replicate.com/v1/predictions/p1",
        "cancel": "https://api.replicate.com/v1/predictions/p1/cancel",
        "web": "https://replicate.com/p/p1",
    },
}


def _create(headers: dict[str, str], status: int = 201, body: Any = None) -> Exchange:
    return Exchange(
        kind="api",
        method="POST",
        path="/v1/models/acme/flux/predictions",
        request_headers=headers,
        request_body=json.dumps({"input": {"prompt": "x"}}).encode(),
        status=status,
        response_headers={"content-type": "application/json"},
        response_body=json.dumps(PREDICTION if body is None else body).encode(),
    )


def test_a_valid_create_passes() -> None:
    checker = OpenApiChecker.load()
    assert checker.check(_create({"cancel-after": "5s", "prefer": "wait=60"})) == []


def test_header_constraints_of_the_document() -> None:
    checker = OpenApiChecker.load()
    assert checker.check(_create({"cancel-after": "3s"}))
    assert checker.check(_create({"cancel-after": "4999ms"}))
    assert checker.check(_create({"prefer": "wait=0"}))
    assert checker.check(_create({"prefer": "wait=61"}))


def test_response_and_webhook_bodies_follow_the_prediction_schema() -> None:
    checker = OpenApiChecker.load()
    assert checker.check(_create({}, body={**PREDICTION, "status": "weird"}))
    assert checker.check(_create({}, body={**PREDICTION, "started_at": None}))
    missing = {k: v for k, v in PREDICTION.items() if k != "urls"}
    assert checker.check(_create({}, body=missing))
    assert checker.check(_create({}, status=200))  # create declares 201/202 only
    for status in ("aborted", "canceled", "succeeded", "failed", "processing"):
        hook = Exchange(
            kind="webhook",
            method="POST",
            path="http://adapter/webhooks/replicate?task=t&attempt=1&token=x",
            request_headers={"webhook-id": "m", "webhook-timestamp": "1", "webhook-signature": "s"},
            request_body=json.dumps({**PREDICTION, "status": status}).encode(),
            status=200,
            response_headers={},
            response_body=b"",
        )
        assert checker.check(hook) == []
    unsigned = Exchange(
        "webhook", "POST", "http://a/w", {}, json.dumps(PREDICTION).encode(), 200, {}, b""
    )
    assert checker.check(unsigned)


def test_routes_and_errors() -> None:
    checker = OpenApiChecker.load()
    unknown = Exchange("api", "GET", "/v1/nope", {}, b"", 200, {}, b"{}")
    assert checker.check(unknown)
    plain_404 = Exchange(
        "api", "GET", "/v1/predictions/x", {}, b"", 404, {"content-type": "text/plain"}, b"no"
    )
    assert checker.check(plain_404)
    problem = Exchange(
        "api",
        "GET",
        "/v1/predictions/x",
        {},
        b"",
        404,
        {"content-type": "application/problem+json"},
        json.dumps({"detail": "Not found", "status": 404}).encode(),
    )
    assert checker.check(problem) == []
