"""Read-only catalogue routes: models, their versions (with an OpenAPI schema), deployments, the account,
the webhook signing secret and output files."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fake_replicate.engine import Engine
from fake_replicate.files import CHUNK
from fake_replicate.model import (
    version_id,
)
from fake_replicate.parsing import VERSION_RE
from fake_replicate.web import ENGINE, not_found

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
    if not VERSION_RE.match(vid):
        return not_found()
    known = engine.versions.get(vid)
    model = f"{request.match_info['owner']}/{request.match_info['name']}"
    if known is not None and known != model:
        return not_found()
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
    if f.length <= CHUNK:
        # One piece: one response written at once (headers and body in a single send), where
        # streaming cost three sends for the benchmarks' 16 KiB images.
        body = b"" if request.method == "HEAD" else f.read()
        return web.Response(
            body=body,
            headers={"Content-Type": f.content_type, "Content-Length": str(f.length)},
        )
    resp = web.StreamResponse(
        headers={"Content-Type": f.content_type, "Content-Length": str(f.length)}
    )
    await resp.prepare(request)
    if request.method != "HEAD":
        for chunk in f.chunks():
            await resp.write(chunk)
    await resp.write_eof()
    return resp
