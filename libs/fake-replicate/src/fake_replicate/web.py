"""The fake's HTTP primitives every route module shares: the engine's app key, problem+json answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from fake_replicate.engine import Engine

ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)


DROPPED: web.RequestKey[bool] = web.RequestKey("dropped", bool)


PROBLEM = "application/problem+json"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    body = {"title": title, "detail": detail, "status": status, **extra}
    return web.json_response(body, status=status, content_type=PROBLEM)


def not_found() -> web.Response:
    return problem(404, "Not found", "The requested resource could not be found.")
