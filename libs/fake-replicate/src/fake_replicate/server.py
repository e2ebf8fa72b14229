"""aiohttp.web application speaking Replicate's HTTP API, plus the ``/_fake`` admin API.

Routes (all ``/v1`` routes need ``Authorization: Bearer <token>``; ``/files`` and ``/_fake`` do not):

* ``POST /v1/predictions`` (body ``version``), ``POST /v1/models/{owner}/{name}/predictions``,
  ``POST /v1/deployments/{owner}/{name}/predictions``: create; headers ``Prefer: wait[=N]`` and
  ``Cancel-After: <duration>`` (``500ms``, ``30s``, ``5m``, ``1h30m``, or bare seconds).
  ``Cancel-After`` under 5 s (``cancel_after_min_s``) and a ``Prefer`` outside ``wait``/``wait=1..60``
  are refused with 422 problem+json (``invalid_fields``), as Replicate refuses them.
* ``GET /v1/models/{owner}/{name}``, ``GET /v1/models/{owner}/{name}/versions[/{id}]``,
  ``GET /v1/deployments/{owner}/{name}``.
* With ``engine.recorder`` set, every ``/v1`` exchange and every webhook delivery is handed to it
  as an :class:`fake_replicate.openapi.Exchange` (checked against Replicate's OpenAPI document).
* ``GET /v1/predictions/{id}``, ``POST /v1/predictions/{id}/cancel``,
  ``GET /v1/predictions[?created_after=&created_before=&cursor=]``, ``GET /v1/webhooks/default/secret``,
  ``GET /v1/account``.
* ``GET /files/{prediction_id}/{name}``: output bytes.
* ``GET /_fake/ledger[?kind=&task=&since_seq=]``, ``GET /_fake/ledger/summary[?group_by=&since=]``,
  ``GET|POST /_fake/config``, ``POST /_fake/reset``, ``GET /_fake/health``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
from aiohttp import web
from pydantic import ValidationError

from fake_replicate.config import EVENT_KINDS, FakeConfig
from fake_replicate.engine import Engine
from fake_replicate.ledger import summary
from fake_replicate.model import (
    DEFAULT_EVENTS,
    EPOCH,
    CreateRequest,
    KnobError,
    Prediction,
    Rejection,
    parse_script,
    to_us,
    version_id,
)
from fake_replicate.openapi import Exchange

logger = logging.getLogger(__name__)

ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
DROPPED: web.RequestKey[bool] = web.RequestKey("dropped", bool)
PROBLEM = "application/problem+json"
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_MODEL_RE = re.compile(rf"^({_NAME})/({_NAME})$")
_MODEL_VERSION_RE = re.compile(rf"^({_NAME})/({_NAME}):([0-9a-f]{{64}})$")
_VERSION_RE = re.compile(r"^[0-9a-f]{64}$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PREFER_WAIT = re.compile(r"^wait(=([1-9]|[1-9][0-9]|60))?$")
"""The OpenAPI document's pattern of ``Prefer`` (n is also checked to be 1..60, as its text says)."""
COMMON_FIELDS = frozenset(
    {"input", "webhook", "webhook_events_filter", "webhook_completed", "stream"}
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    body = {"title": title, "detail": detail, "status": status, **extra}
    return web.json_response(body, status=status, content_type=PROBLEM)


def parse_duration(value: str) -> float | None:
    """Go-style duration (``1h30m``, ``500ms``, ``30s``) or bare seconds; None if invalid."""
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pos = 0
        seconds = 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                return None
            seconds += float(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        if pos != len(text):
            return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds


def parse_prefer_wait(value: str | None) -> float | None:
    """Seconds to hold the create open; None without the header; ValueError when Replicate refuses
    it (``wait=0``, over 60, anything outside ``^wait(=n)?$``)."""
    if value is None:
        return None
    m = _PREFER_WAIT.match(value.strip())
    if m is None or (m.group(2) and not 1 <= int(m.group(2)) <= 60):
        raise ValueError(value)
    return float(m.group(2)) if m.group(2) else 60.0


def parse_time_us(value: str) -> int:
    """ISO-8601 (naive = UTC; a ' ' from an unencoded '+' is tolerated) -> Unix microseconds."""
    dt = datetime.fromisoformat(value.strip().replace(" ", "+"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - EPOCH) // timedelta(microseconds=1)


def _rate_headers(engine: Engine, *, create: bool) -> dict[str, str]:
    bucket = engine.create_bucket if create else engine.other_bucket
    tokens = bucket.available()
    reset = 0 if bucket.rate <= 0 else math.ceil((bucket.burst - tokens) / bucket.rate)
    return {"ratelimit-remaining": str(max(0, int(tokens))), "ratelimit-reset": str(reset)}


def _throttled(retry_after: int) -> web.Response:
    resp = problem(
        429,
        "Too Many Requests",
        f"Request was throttled. Your rate limit resets in ~{retry_after}s.",
        retry_after=retry_after,
    )
    resp.headers["Retry-After"] = str(retry_after)
    return resp


def _rejection_response(rej: Rejection) -> web.Response:
    if rej.status == 429:
        return _throttled(rej.retry_after_s if rej.retry_after_s is not None else 1)
    titles = {
        400: "Bad Request",
        401: "Unauthenticated",
        402: "Payment Required",
        403: "Forbidden",
        404: "Not found",
        409: "Conflict",
        422: "Unprocessable Entity",
        500: "Internal Server Error",
        502: "Bad Gateway",
        503: "Service Unavailable",
        504: "Gateway Timeout",
    }
    title = titles.get(rej.status, "Error")
    return problem(rej.status, title, f"{title} (fake-replicate: {rej.reason})")


def _invalid(fields: list[dict[str, str]]) -> web.Response:
    detail = "; ".join(f"- {f['field']}: {f['description']}" for f in fields)
    return problem(422, "Input validation failed", detail, invalid_fields=fields)


@web.middleware
async def v1_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Auth and the non-create rate limit for /v1; problem+json for unknown routes."""
    path = request.path
    if not path.startswith("/v1/"):
        return await handler(request)
    engine = request.app[ENGINE]
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() not in ("bearer", "token") or token.strip() != engine.config.token:
        return problem(401, "Unauthenticated", "You did not pass a valid authentication token")
    is_create = request.method == "POST" and path.endswith("/predictions")
    if not is_create:
        wait = engine.other_bucket.try_take()
        allowed = wait <= 0
        if not allowed:
            return _throttled(60 if math.isinf(wait) else max(1, math.ceil(wait)))
    try:
        resp = await handler(request)
    except web.HTTPNotFound:
        resp = problem(404, "Not found", "The requested resource could not be found.")
    except web.HTTPMethodNotAllowed:
        resp = problem(405, "Method Not Allowed", f"{request.method} is not allowed here")
    if not resp.prepared:
        resp.headers.update(_rate_headers(engine, create=is_create))
    if (
        engine.recorder is not None
        and not request.get(DROPPED, False)
        and isinstance(resp, web.Response)
    ):
        engine.recorder(
            Exchange(
                kind="api",
                method=request.method,
                path=path,
                request_headers={k.lower(): v for k, v in request.headers.items()},
                request_body=await request.read() if request.can_read_body else b"",
                status=resp.status,
                response_headers={k.lower(): v for k, v in resp.headers.items()},
                response_body=bytes(resp.body) if isinstance(resp.body, bytes | bytearray) else b"",
            )
        )
    return resp


# --- create ------------------------------------------------------------------------------
async def create_prediction(request: web.Request) -> web.StreamResponse:
    return await _create(request, route="version")


async def create_model_prediction(request: web.Request) -> web.StreamResponse:
    return await _create(request, route="model")


async def create_deployment_prediction(request: web.Request) -> web.StreamResponse:
    return await _create(request, route="deployment")


def _best_effort(body: Any) -> tuple[str | None, Mapping[str, Any] | None]:
    if not isinstance(body, dict):
        return None, None
    webhook = body.get("webhook") if isinstance(body.get("webhook"), str) else None
    inputs = body.get("input") if isinstance(body.get("input"), dict) else None
    return webhook, inputs


def _validate(
    engine: Engine,
    body: dict[str, Any],
    route: Literal["version", "model", "deployment"],
    owner: str,
    name: str,
) -> tuple[tuple[str, str, str | None] | None, list[dict[str, str]]]:
    """((model, version, deployment) | None, invalid_fields)."""
    errors: list[dict[str, str]] = []
    allowed = COMMON_FIELDS | ({"version"} if route == "version" else frozenset())
    errors.extend(
        {
            "type": "additional_property_not_allowed",
            "field": key,
            "description": f"Additional property {key} is not allowed",
        }
        for key in body
        if key not in allowed
    )
    target: tuple[str, str, str | None] | None = None
    if route == "version":
        raw = body.get("version")
        if raw is None:
            errors.append(
                {"type": "required", "field": "version", "description": "version is required"}
            )
        elif not isinstance(raw, str):
            errors.append(
                {"type": "invalid_type", "field": "version", "description": "Expected: string"}
            )
        elif m := _MODEL_VERSION_RE.match(raw):
            target = (f"{m.group(1)}/{m.group(2)}", m.group(3), None)
            engine.versions[m.group(3)] = f"{m.group(1)}/{m.group(2)}"
        elif _VERSION_RE.match(raw):
            target = (engine.versions.get(raw, f"fake/model-{raw[:8]}"), raw, None)
        elif m := _MODEL_RE.match(raw):
            target = (f"{m.group(1)}/{m.group(2)}", "hidden", None)
        else:
            errors.append(
                {
                    "type": "invalid",
                    "field": "version",
                    "description": "Invalid version or not permitted",
                }
            )
    elif route == "model":
        target = (f"{owner}/{name}", "hidden", None)
    else:
        target = (f"{owner}/{name}", version_id(f"deployment:{owner}/{name}"), f"{owner}/{name}")
    if "input" not in body:
        errors.append({"type": "required", "field": "input", "description": "input is required"})
    elif not isinstance(body["input"], dict):
        errors.append({"type": "invalid_type", "field": "input", "description": "Expected: object"})
    webhook = body.get("webhook")
    if webhook is not None and not _valid_url(webhook):
        errors.append(
            {"type": "format", "field": "webhook", "description": "Does not match format 'uri'"}
        )
    completed = body.get("webhook_completed")
    if completed is not None and not _valid_url(completed):
        errors.append(
            {
                "type": "format",
                "field": "webhook_completed",
                "description": "Does not match format 'uri'",
            }
        )
    filt = body.get("webhook_events_filter")
    if filt is not None and (
        not isinstance(filt, list) or not all(isinstance(e, str) and e in EVENT_KINDS for e in filt)
    ):
        errors.append(
            {
                "type": "enum",
                "field": "webhook_events_filter",
                "description": f"Each item must be one of: {', '.join(EVENT_KINDS)}",
            }
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        errors.append(
            {"type": "invalid_type", "field": "stream", "description": "Expected: boolean"}
        )
    return (None if errors else target), errors


def _valid_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, ValueError):
        return False
    return url.scheme in ("http", "https") and bool(url.host)


async def _create(
    request: web.Request, *, route: Literal["version", "model", "deployment"]
) -> web.StreamResponse:
    engine = request.app[ENGINE]
    cfg = engine.config
    raw = await request.read()
    try:
        body: Any = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
        bad_json = True
    else:
        bad_json = False
    hint_webhook, hint_input = _best_effort(body)
    pre = engine.pre_create()
    if isinstance(pre, Rejection):
        engine.record_rejection(pre, hint_webhook, hint_input)
        return _rejection_response(pre)
    drop = pre == "drop"
    if bad_json or not isinstance(body, dict):
        engine.record_rejection(Rejection(400, "bad_json"), hint_webhook, hint_input)
        return problem(400, "Bad Request", "The request body must be a JSON object")
    target, errors = _validate(
        engine, body, route, request.match_info.get("owner", ""), request.match_info.get("name", "")
    )
    cancel_after: float | None = None
    cancel_header = request.headers.get("Cancel-After")
    if cancel_header is not None:
        cancel_after = parse_duration(cancel_header)
        if cancel_after is None:
            errors.append(
                {"type": "invalid", "field": "Cancel-After", "description": "Invalid duration"}
            )
        elif cancel_after < cfg.cancel_after_min_s:
            errors.append(
                {
                    "type": "minimum",
                    "field": "Cancel-After",
                    "description": "The minimum allowed duration is 5 seconds",
                }
            )
    try:
        wait = parse_prefer_wait(request.headers.get("Prefer"))
    except ValueError:
        wait = None
        errors.append(
            {
                "type": "pattern",
                "field": "Prefer",
                "description": "Prefer must be wait or wait=n with n between 1 and 60",
            }
        )
    if errors or target is None:
        engine.record_rejection(Rejection(422, "invalid_fields"), hint_webhook, hint_input)
        return _invalid(errors)
    inputs: dict[str, Any] = body["input"]
    try:
        script = parse_script(inputs, cfg, engine.rng)
    except KnobError as exc:
        engine.record_rejection(Rejection(422, "invalid_input"), hint_webhook, inputs)
        return _invalid(
            [
                {
                    "type": "invalid",
                    "field": f"input.{exc.field_name}",
                    "description": exc.description,
                }
            ]
        )
    if script.create_status is not None:
        rej = Rejection(script.create_status, "input_knob", cfg.script_429_retry_after_s)
        engine.record_rejection(rej, hint_webhook, inputs)
        return _rejection_response(rej)
    if not drop:
        fault = engine.roll_create_faults()
        if isinstance(fault, Rejection):
            engine.record_rejection(fault, hint_webhook, inputs)
            return _rejection_response(fault)
        drop = fault == "drop"
    webhook = body.get("webhook")
    filt = body.get("webhook_events_filter")
    events = frozenset(filt) if filt is not None else DEFAULT_EVENTS
    if webhook is None and body.get("webhook_completed") is not None:
        webhook, events = body["webhook_completed"], frozenset({"completed"})
    model, version, deployment = target
    p = engine.create(
        CreateRequest(
            model=model,
            version=version,
            deployment=deployment,
            input=inputs,
            webhook=webhook,
            events_filter=events,
            cancel_after_s=cancel_after,
        ),
        script,
        response_dropped=drop,
    )
    if drop:
        return await _drop(request, cfg.create_drop_delay_s)
    if wait is not None and not p.terminal:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(p.done.wait(), timeout=wait)
    return _prediction_response(engine, p, status=201)


async def _drop(request: web.Request, delay: float) -> web.StreamResponse:
    """Execute-then-drop: the create took effect; close the connection without an answer."""
    request[DROPPED] = True
    if delay > 0:
        await asyncio.sleep(delay)
    if request.transport is not None:
        request.transport.abort()
    logger.info("create response dropped", extra={"action": "create_response_dropped"})
    return web.Response(status=201)  # never reaches the client: the transport is gone


def _prediction_response(engine: Engine, p: Prediction, *, status: int = 200) -> web.Response:
    resp = web.json_response(engine.to_json(p), status=status)
    resp.headers["Location"] = f"{engine.base_url}/v1/predictions/{p.id}"
    return resp


# --- get / cancel / list / secret ---------------------------------------------------------
def _lookup(request: web.Request) -> tuple[Engine, Prediction | None]:
    engine = request.app[ENGINE]
    return engine, engine.predictions.get(request.match_info["id"])


def _not_found() -> web.Response:
    return problem(404, "Not found", "The requested resource could not be found.")


async def get_prediction(request: web.Request) -> web.StreamResponse:
    engine, p = _lookup(request)
    if engine.rng.random() < engine.config.get_500_rate:
        return problem(500, "Internal Server Error", "fake-replicate: injected GET failure")
    if p is None:
        return _not_found()
    return _prediction_response(engine, p)


async def cancel_prediction(request: web.Request) -> web.StreamResponse:
    engine, p = _lookup(request)
    if p is None:
        return _not_found()
    engine.cancel(p)
    return _prediction_response(engine, p)


def _encode_cursor(index: int, direction: Literal["n", "p"]) -> str:
    raw = json.dumps({"i": index, "d": direction}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    padded = cursor + "=" * (-len(cursor) % 4)
    data = json.loads(base64.urlsafe_b64decode(padded))
    index, direction = data["i"], data["d"]
    if not isinstance(index, int) or direction not in ("n", "p"):
        raise ValueError("bad cursor")
    return index, direction


async def list_predictions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    if engine.rng.random() < engine.config.get_500_rate:
        return problem(500, "Internal Server Error", "fake-replicate: injected GET failure")
    q = request.query
    try:
        after = parse_time_us(q["created_after"]) if "created_after" in q else None
        before = parse_time_us(q["created_before"]) if "created_before" in q else None
    except ValueError:
        return problem(
            400, "Bad Request", "created_after/created_before must be ISO-8601 date-times"
        )
    items = [
        p
        for p in engine.listing()
        if (after is None or to_us(p.created_at) >= after)
        and (before is None or to_us(p.created_at) < before)
    ]
    size = engine.config.list_page_size
    if "cursor" in q:
        try:
            index, direction = _decode_cursor(q["cursor"])
        except (ValueError, KeyError, TypeError, binascii.Error, json.JSONDecodeError):
            return problem(400, "Bad Request", "Invalid cursor")
        if direction == "n":
            page = [p for p in items if p.index < index][:size]
        else:
            newer = [p for p in items if p.index > index]
            page = newer[-size:]
    else:
        page = items[:size]
    base_q = {k: v for k, v in q.items() if k in ("created_after", "created_before")}

    def link(index: int, direction: Literal["n", "p"]) -> str:
        params = {**base_q, "cursor": _encode_cursor(index, direction)}
        return str(httpx.URL(f"{engine.base_url}/v1/predictions", params=params))

    nxt = prev = None
    if page:
        if any(p.index < page[-1].index for p in items):
            nxt = link(page[-1].index, "n")
        if any(p.index > page[0].index for p in items):
            prev = link(page[0].index, "p")
    return web.json_response(
        {
            "next": nxt,
            "previous": prev,
            "results": [engine.to_json(p, listing=True) for p in page],
        }
    )


# --- models, versions, deployments --------------------------------------------------------
RELEASED_AT = "2025-01-01T00:00:00.000000Z"
VERSION_OPENAPI_SCHEMA: dict[str, Any] = {
    "openapi": "3.0.2",
    "info": {"title": "Cog", "version": "0.1.0"},
    "paths": {},
    "components": {
        "schemas": {
            "Input": {
                "type": "object",
                "title": "Input",
                "properties": {"prompt": {"type": "string", "title": "Prompt"}},
            },
            "Output": {"type": "array", "items": {"type": "string", "format": "uri"}},
        }
    },
}


def _version_json(vid: str) -> dict[str, Any]:
    return {
        "id": vid,
        "created_at": RELEASED_AT,
        "cog_version": "0.14.0",
        "openapi_schema": VERSION_OPENAPI_SCHEMA,
    }


def _model_versions(engine: Engine, owner: str, name: str) -> list[str]:
    """Versions of a model: its default one plus those seen in ``owner/name:version`` creates."""
    model = f"{owner}/{name}"
    seen = [v for v, m in engine.versions.items() if m == model]
    default = version_id(f"model:{model}")
    return [default] + [v for v in seen if v != default]


async def get_model_version(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    vid = request.match_info["version"]
    if not _VERSION_RE.match(vid):
        return _not_found()
    known = engine.versions.get(vid)
    model = f"{request.match_info['owner']}/{request.match_info['name']}"
    if known is not None and known != model:
        return _not_found()
    return web.json_response(_version_json(vid))


async def list_model_versions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    owner, name = request.match_info["owner"], request.match_info["name"]
    versions = _model_versions(engine, owner, name)
    return web.json_response(
        {
            "next": None,
            "previous": None,
            "results": [_version_json(v) for v in versions],
        }
    )


async def get_model(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    owner, name = request.match_info["owner"], request.match_info["name"]
    latest = _model_versions(engine, owner, name)[-1]
    return web.json_response(
        {
            "url": f"https://replicate.com/{owner}/{name}",
            "owner": owner,
            "name": name,
            "description": "A model of fake-replicate",
            "visibility": "public",
            "is_official": False,
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "cover_image_url": None,
            "run_count": sum(
                1 for p in engine.predictions.values() if p.model == f"{owner}/{name}"
            ),
            "default_example": None,
            "latest_version": _version_json(latest),
        }
    )


async def get_deployment(request: web.Request) -> web.StreamResponse:
    owner, name = request.match_info["owner"], request.match_info["name"]
    return web.json_response(
        {
            "owner": owner,
            "name": name,
            "current_release": {
                "number": 1,
                "model": f"{owner}/{name}",
                "version": version_id(f"deployment:{owner}/{name}"),
                "created_at": RELEASED_AT,
                "created_by": {"type": "organization", "username": owner, "name": owner},
                "configuration": {"hardware": "gpu-t4", "min_instances": 0, "max_instances": 5},
            },
        }
    )


async def webhook_secret(request: web.Request) -> web.StreamResponse:
    return web.json_response({"key": request.app[ENGINE].config.webhook_secret})


async def account(request: web.Request) -> web.StreamResponse:
    return web.json_response({"type": "organization", "username": "fake", "name": "Fake Replicate"})


async def serve_file(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    f = engine.file(request.match_info["id"], request.match_info["name"])
    if f is None:
        return web.Response(status=404, text="not found")
    resp = web.StreamResponse(
        headers={"Content-Type": f.content_type, "Content-Length": str(f.length)}
    )
    await resp.prepare(request)
    if request.method != "HEAD":
        for chunk in f.chunks():
            await resp.write(chunk)
    await resp.write_eof()
    return resp


# --- admin -------------------------------------------------------------------------------
async def admin_ledger(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    q = request.query
    try:
        since = int(q.get("since_seq", "0"))
    except ValueError:
        return problem(400, "Bad Request", "since_seq must be an integer")
    events = engine.ledger.events(kind=q.get("kind"), task=q.get("task"), since_seq=since)
    return web.json_response({"events": events, "next_seq": len(engine.ledger)})


async def admin_summary(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    since = request.query.get("since", "start")
    if since not in ("start", "create"):
        return problem(400, "Bad Request", "since must be 'start' or 'create'")
    events = engine.ledger.events()
    return web.json_response(
        summary(
            events,
            group_by=request.query.get("group_by"),
            since="start" if since == "start" else "create",
        )
    )


async def admin_get_config(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[ENGINE].config.model_dump())


async def admin_set_config(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    try:
        changes = await request.json()
    except json.JSONDecodeError:
        return problem(400, "Bad Request", "body must be a JSON object")
    if not isinstance(changes, dict):
        return problem(400, "Bad Request", "body must be a JSON object")
    try:
        cfg = engine.update_config(changes)
    except ValidationError as exc:
        return problem(
            422, "Invalid config", str(exc), errors=json.loads(exc.json(include_url=False))
        )
    except ValueError as exc:
        return problem(422, "Invalid config", str(exc))
    return web.json_response(cfg.model_dump())


async def admin_reset(request: web.Request) -> web.StreamResponse:
    await request.app[ENGINE].reset()
    return web.json_response({"reset": True})


async def admin_health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


def build_app(engine: Engine) -> web.Application:
    app = web.Application(middlewares=[v1_middleware], client_max_size=16 * 1024 * 1024)
    app[ENGINE] = engine
    r = app.router
    r.add_post("/v1/predictions", create_prediction)
    r.add_get("/v1/predictions", list_predictions)
    r.add_get("/v1/predictions/{id}", get_prediction)
    r.add_post("/v1/predictions/{id}/cancel", cancel_prediction)
    r.add_post("/v1/models/{owner}/{name}/predictions", create_model_prediction)
    r.add_post("/v1/deployments/{owner}/{name}/predictions", create_deployment_prediction)
    r.add_get("/v1/models/{owner}/{name}", get_model)
    r.add_get("/v1/models/{owner}/{name}/versions", list_model_versions)
    r.add_get("/v1/models/{owner}/{name}/versions/{version}", get_model_version)
    r.add_get("/v1/deployments/{owner}/{name}", get_deployment)
    r.add_get("/v1/webhooks/default/secret", webhook_secret)
    r.add_get("/v1/account", account)
    r.add_get("/files/{id}/{name}", serve_file)
    r.add_get("/_fake/ledger", admin_ledger)
    r.add_get("/_fake/ledger/summary", admin_summary)
    r.add_get("/_fake/config", admin_get_config)
    r.add_post("/_fake/config", admin_set_config)
    r.add_post("/_fake/reset", admin_reset)
    r.add_get("/_fake/health", admin_health)
    return app


class FakeReplicate:
    """The fake as an in-process server: ``async with FakeReplicate(cfg) as fake: fake.url``."""

    def __init__(self, config: FakeConfig, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.engine = Engine(config)
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("FakeReplicate is not started")
        return self._url

    @property
    def config(self) -> FakeConfig:
        return self.engine.config

    async def start(self) -> str:
        await self.engine.start()
        runner = web.AppRunner(build_app(self.engine), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        port = runner.addresses[0][1]
        self._url = f"http://{self._host}:{port}"
        if not self.engine.config.public_url:
            self.engine.base_url = self._url
        logger.info("fake replicate listening", extra={"action": "listening", "url": self._url})
        return self._url

    async def stop(self) -> None:
        await self.engine.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def configure(self, **changes: Any) -> FakeConfig:
        return self.engine.update_config(changes)

    async def reset(self) -> None:
        await self.engine.reset()

    async def __aenter__(self) -> FakeReplicate:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
