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
from collections.abc import Mapping
from typing import Any, Literal

import httpx
from aiohttp import web

from fake_replicate.admin_routes import (
    admin_get_config,
    admin_health,
    admin_ledger,
    admin_reset,
    admin_set_config,
    admin_summary,
)
from fake_replicate.catalog import (
    account,
    get_deployment,
    get_model,
    get_model_version,
    list_model_versions,
    serve_file,
    webhook_secret,
)
from fake_replicate.config import FakeConfig
from fake_replicate.engine import Engine
from fake_replicate.model import (
    DEFAULT_EVENTS,
    CreateRequest,
    KnobError,
    Prediction,
    Rejection,
    parse_script,
    to_us,
)
from fake_replicate.openapi import Exchange
from fake_replicate.parsing import parse_duration, parse_prefer_wait, parse_time_us, validate_create
from fake_replicate.web import DROPPED, ENGINE, Handler, not_found, problem

logger = logging.getLogger(__name__)


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
    target, errors = validate_create(
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


async def get_prediction(request: web.Request) -> web.StreamResponse:
    engine, p = _lookup(request)
    if engine.rng.random() < engine.config.get_500_rate:
        return problem(500, "Internal Server Error", "fake-replicate: injected GET failure")
    if p is None:
        return not_found()
    return _prediction_response(engine, p)


async def cancel_prediction(request: web.Request) -> web.StreamResponse:
    engine, p = _lookup(request)
    if p is None:
        return not_found()
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
