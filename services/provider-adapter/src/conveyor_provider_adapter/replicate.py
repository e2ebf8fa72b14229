"""Async client of Replicate's HTTP API (create in three forms, get, cancel, list, webhook secret).

Errors are ``application/problem+json`` and become typed exceptions:

* :class:`RateLimited` (429; also 402, a credit limit) with ``retry_after`` from the body's
  ``retry_after`` or the ``Retry-After`` header: nothing was created, retrying is safe;
* :class:`ClientError` (other 4xx): a definite answer, nothing was created; classify.classify_status
  says whether a new attempt may succeed (408, 409, 425: the refusal passes) or not (the request
  itself is wrong: 422 for the OpenAPI document's constraints, e.g. the body schema, ``Cancel-After``
  under 5 s or a ``Prefer`` outside ``wait=1..60``; 400, 401/403, 404, 413...);
* :class:`ServerError` (5xx of get/cancel/list);
* :class:`Ambiguous` (create only): a timeout after the request was sent, a reset connection or a
  5xx. The prediction may exist: never resubmit blindly, reconcile;
* :class:`Unreachable`: the request never left (connect error/timeout): nothing was created.

There is no idempotency key on create (see reliability.md 2.5), hence the care above.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from yarl import URL

from conveyor_common import tracing
from conveyor_provider_adapter.web_client import Answer, MaybeSent, NotSent, WebClient

logger = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "aborted"})
"""Terminal statuses; anything else (``starting``, ``processing``, unknown values) is not terminal."""

WEBHOOK_EVENTS = ("start", "logs", "completed")
"""The webhook events the adapter asks for (docs/adr/0005): ``start`` adopts an ambiguous create and
reports the start, ``logs`` carries the progress percentage, ``completed`` the terminal status and
output. ``output`` (partial outputs) is not used: the terminal result copies the final output."""

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_MODEL_RE = re.compile(rf"^({_NAME})/({_NAME})$")
_MODEL_VERSION_RE = re.compile(rf"^({_NAME})/({_NAME}):([0-9a-f]{{64}})$")
_VERSION_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------------
# Errors


class ReplicateError(Exception):
    """An error answer or a transport failure of a Replicate call."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        title: str = "",
        detail: str = "",
        invalid_fields: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.detail = detail
        self.invalid_fields = list(invalid_fields)


class RateLimited(ReplicateError):
    """429 (or 402): nothing was created; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ClientError(ReplicateError):
    """A definite 4xx answer (invalid input, auth, not found...)."""


class ServerError(ReplicateError):
    """A 5xx answer to a get, cancel or list call."""


class Ambiguous(ReplicateError):
    """A create whose outcome is unknown: the prediction may or may not exist."""


class Unreachable(ReplicateError):
    """The request never reached Replicate (connect failure): nothing happened."""


# --------------------------------------------------------------------------------------------------
# Targets and predictions


@dataclass(frozen=True)
class Target:
    """Which create form to use."""

    form: Literal["version", "model", "deployment"]
    owner: str
    name: str
    version: str | None = None

    @property
    def model(self) -> str:
        """``owner/name``."""
        return f"{self.owner}/{self.name}"


def parse_target(model: str | None, deployment: str | None) -> Target:
    """The create form for a DispatchTask target.

    ``owner/name:version`` -> ``POST /v1/predictions`` with ``version``; ``owner/name`` ->
    ``POST /v1/models/{owner}/{name}/predictions``; a deployment ``owner/name`` ->
    ``POST /v1/deployments/{owner}/{name}/predictions``. A bare 64-hex version id uses the version form.
    """
    if deployment:
        m = _MODEL_RE.match(deployment)
        if m is None:
            raise ValueError(f"deployment must be owner/name, got {deployment!r}")
        return Target("deployment", m.group(1), m.group(2))
    if not model:
        raise ValueError("the dispatch names neither a model nor a deployment")
    if m := _MODEL_VERSION_RE.match(model):
        return Target("version", m.group(1), m.group(2), m.group(3))
    if m := _MODEL_RE.match(model):
        return Target("model", m.group(1), m.group(2))
    if _VERSION_RE.match(model):
        return Target("version", "", "", model)
    raise ValueError(f"model must be owner/name or owner/name:<64-hex version>, got {model!r}")


def parse_time(value: Any) -> datetime | None:
    """An ISO-8601 timestamp of the API (``Z`` or offset), or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Prediction:
    """A prediction object (lenient: unknown statuses and missing fields are tolerated)."""

    id: str
    status: str
    model: str = ""
    version: str = ""
    deployment: str = ""
    input: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    error: str | None = None
    logs: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    deadline: datetime | None = None
    data_removed: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def terminal(self) -> bool:
        """Whether the status is one of the four terminal ones."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Prediction:
        """Parse an API object; raises ValueError when it has no id."""
        pid = obj.get("id")
        if not isinstance(pid, str) or not pid:
            raise ValueError("prediction object without an id")
        status = obj.get("status")
        error = obj.get("error")
        logs = obj.get("logs")
        inp = obj.get("input")
        metrics = obj.get("metrics")
        return cls(
            id=pid,
            status=status if isinstance(status, str) else "unknown",
            model=str(obj.get("model") or ""),
            version=str(obj.get("version") or ""),
            deployment=str(obj.get("deployment") or ""),
            input=dict(inp) if isinstance(inp, dict) else {},
            output=obj.get("output"),
            error=None if error is None else str(error),
            logs=logs if isinstance(logs, str) else "",
            metrics=dict(metrics) if isinstance(metrics, dict) else {},
            created_at=parse_time(obj.get("created_at")),
            started_at=parse_time(obj.get("started_at")),
            completed_at=parse_time(obj.get("completed_at")),
            deadline=parse_time(obj.get("deadline")),
            data_removed=bool(obj.get("data_removed", False)),
            raw=dict(obj),
        )


CANCEL_AFTER_MIN_S = 5
"""Replicate's documented minimum ``Cancel-After`` ("The minimum allowed duration is 5 seconds"):
shorter values are refused with 422. A run deadline closer than that is enforced by the adapter's own
cancel (commands.py), with ``Cancel-After: 5s`` as the backstop."""


def cancel_after_seconds(deadline: datetime, now: datetime | None = None) -> float:
    """Seconds from ``now`` to ``deadline`` (may be negative)."""
    return (deadline - (now or datetime.now(UTC))).total_seconds()


def cancel_after_value(deadline: datetime | None, now: datetime | None = None) -> str | None:
    """``Cancel-After`` for an absolute deadline: whole seconds rounded up, never below
    :data:`CANCEL_AFTER_MIN_S`; None without a deadline."""
    if deadline is None:
        return None
    seconds = math.ceil(cancel_after_seconds(deadline, now) - 1e-6)
    return f"{max(CANCEL_AFTER_MIN_S, seconds)}s"


# --------------------------------------------------------------------------------------------------
# Error parsing


def _retry_after_header(value: str | None, now: datetime | None = None) -> float | None:
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _problem(response: Answer) -> dict[str, Any]:
    try:
        body = json.loads(response.body)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return {"detail": response.text[:500]}
    return body if isinstance(body, dict) else {"detail": str(body)[:500]}


def error_from_response(
    response: Answer, *, create: bool, default_retry_after: float
) -> ReplicateError:
    """The typed exception for a non-2xx answer."""
    body = _problem(response)
    status = response.status
    title = str(body.get("title") or "")
    detail = str(body.get("detail") or "")
    invalid = body.get("invalid_fields")
    fields: list[Mapping[str, Any]] = (
        [f for f in invalid if isinstance(f, dict)] if isinstance(invalid, list) else []
    )
    message = f"replicate {response.method} {response.url.path}: {status} {detail or title}".strip()
    kw: dict[str, Any] = {
        "status": status,
        "title": title,
        "detail": detail,
        "invalid_fields": fields,
    }
    if status in (429, 402):
        retry: float | None = None
        raw = body.get("retry_after")
        if isinstance(raw, int | float) and not isinstance(raw, bool) and raw >= 0:
            retry = float(raw)
        if retry is None:
            retry = _retry_after_header(response.headers.get("retry-after"))
        return RateLimited(
            message, retry_after=default_retry_after if retry is None else retry, **kw
        )
    if 400 <= status < 500:
        return ClientError(message, **kw)
    if create:
        return Ambiguous(message, **kw)
    return ServerError(message, **kw)


# --------------------------------------------------------------------------------------------------
# Client


@dataclass(frozen=True)
class CreateRequest:
    """What to create."""

    target: Target
    input: dict[str, Any]
    webhook: str | None = None
    events_filter: Sequence[str] = WEBHOOK_EVENTS
    deadline: datetime | None = None


class ReplicateClient:
    """Replicate API calls over one pooled aiohttp session (web_client.py: no redirects, short
    timeouts, a CLIENT span per call when tracing is on)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        connect_timeout: float = 3.0,
        create_timeout: float = 10.0,
        request_timeout: float = 10.0,
        default_retry_after: float = 5.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._create_timeout = create_timeout
        self._default_retry_after = default_retry_after
        self._http = WebClient(
            connect_timeout=connect_timeout,
            read_timeout=request_timeout,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "conveyor-provider-adapter"},
            trace=tracing.enabled(),
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.close()

    # ---- create ----

    async def create(self, req: CreateRequest) -> Prediction:
        """Create a prediction; see the module docstring for the exceptions."""
        target = req.target
        body: dict[str, Any] = {"input": req.input}
        if target.form == "version":
            body["version"] = (
                f"{target.owner}/{target.name}:{target.version}" if target.owner else target.version
            )
            path = "/v1/predictions"
        elif target.form == "model":
            path = f"/v1/models/{target.owner}/{target.name}/predictions"
        else:
            path = f"/v1/deployments/{target.owner}/{target.name}/predictions"
        if req.webhook:
            body["webhook"] = req.webhook
            body["webhook_events_filter"] = list(req.events_filter)
        headers: dict[str, str] = {}
        cancel_after = cancel_after_value(req.deadline)
        if cancel_after is not None:
            headers["Cancel-After"] = cancel_after
        try:
            response = await self._http.request(
                "POST",
                self.base_url + path,
                json=body,
                headers=headers,
                read_timeout=self._create_timeout,
            )
        except NotSent as exc:
            raise Unreachable(f"replicate create: {exc}") from exc
        except MaybeSent as exc:
            # A timeout, reset or closed connection after (part of) the request was sent.
            raise Ambiguous(f"replicate create: failed after sending: {exc}") from exc
        if response.status >= 300:
            raise error_from_response(
                response, create=True, default_retry_after=self._default_retry_after
            )
        try:
            return Prediction.from_json(json.loads(response.body))
        except (ValueError, TypeError) as exc:
            # A 2xx without a readable prediction: it was probably created.
            raise Ambiguous(f"replicate create: unreadable 2xx answer: {exc}") from exc

    # ---- get / cancel / list ----

    async def _call(self, method: str, url: str, params: Mapping[str, str] | None = None) -> Any:
        target = self.base_url + url if url.startswith("/") else url
        try:
            response = await self._http.request(method, target, params=params or None)
        except NotSent as exc:
            raise Unreachable(f"replicate {method} {url}: {exc}") from exc
        except MaybeSent as exc:
            raise ServerError(f"replicate {method} {url}: {exc}") from exc
        if response.status >= 300:
            raise error_from_response(
                response, create=False, default_retry_after=self._default_retry_after
            )
        try:
            return json.loads(response.body)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            raise ServerError(f"replicate {method} {url}: unreadable answer") from exc

    async def get(self, prediction_id: str) -> Prediction:
        """``GET /v1/predictions/{id}``."""
        return Prediction.from_json(await self._call("GET", f"/v1/predictions/{prediction_id}"))

    async def cancel(self, prediction_id: str) -> Prediction:
        """``POST /v1/predictions/{id}/cancel`` (a terminal prediction answers as it is)."""
        return Prediction.from_json(
            await self._call("POST", f"/v1/predictions/{prediction_id}/cancel")
        )

    async def list_predictions(
        self,
        *,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        max_pages: int = 50,
    ) -> AsyncIterator[Prediction]:
        """``GET /v1/predictions``, newest first, following the ``next`` cursors."""
        params: dict[str, str] = {}
        if created_after is not None:
            params["created_after"] = (
                created_after.astimezone(UTC).isoformat().replace("+00:00", "Z")
            )
        if created_before is not None:
            params["created_before"] = (
                created_before.astimezone(UTC).isoformat().replace("+00:00", "Z")
            )
        url: str | None = "/v1/predictions"
        query: dict[str, str] | None = params
        pages = 0
        while url and pages < max_pages:
            page = await self._call("GET", url, query)
            pages += 1
            results = page.get("results") if isinstance(page, dict) else None
            for obj in results if isinstance(results, list) else []:
                if not isinstance(obj, dict):
                    continue
                try:
                    prediction = Prediction.from_json(obj)
                except ValueError:
                    continue
                if (
                    created_after is not None
                    and prediction.created_at is not None
                    and prediction.created_at < created_after
                ):
                    return  # newest first: everything after this is older
                yield prediction
            nxt = page.get("next") if isinstance(page, dict) else None
            url = self._same_origin(nxt) if isinstance(nxt, str) and nxt else None
            query = None

    def _same_origin(self, url: str) -> str | None:
        """A cursor URL, only when it points at our API (never send the token elsewhere)."""
        base = URL(self.base_url)
        try:
            target = URL(url)
        except ValueError:
            return None
        if not target.is_absolute():
            return url if url.startswith("/") else None
        if (target.scheme, target.host, target.port) != (base.scheme, base.host, base.port):
            logger.warning(
                "list cursor on another origin ignored",
                extra={"action": "replicate_cursor_rejected", "host": target.host},
            )
            return None
        return str(target)

    async def webhook_secret(self) -> str:
        """``GET /v1/webhooks/default/secret`` -> ``whsec_...``."""
        body = await self._call("GET", "/v1/webhooks/default/secret")
        key = body.get("key") if isinstance(body, dict) else None
        if not isinstance(key, str) or not key:
            raise ServerError("webhook secret answer has no key")
        return key
