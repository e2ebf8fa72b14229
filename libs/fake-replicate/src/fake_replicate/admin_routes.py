"""The fake's admin routes (not Replicate's): the ledger, a summary, the live configuration (fault
knobs), reset and health."""

from __future__ import annotations

import json

from aiohttp import web
from pydantic import ValidationError

from fake_replicate.ledger import summary
from fake_replicate.web import ENGINE, problem


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
