"""Checks of recorded HTTP exchanges against Replicate's published OpenAPI document.

``replicate-openapi.json`` beside this module is Replicate's OpenAPI document as published (a copy of
``shared/reference/replicate-openapi.json``). :class:`OpenApiChecker` checks one :class:`Exchange`
(an API call the fake answered, or a webhook it delivered):

* the route and method are an operation of the document (under its server path ``/v1``);
* a request body validates against the operation's ``requestBody`` schema; ``Cancel-After`` is a
  duration of at least 5 s and ``Prefer`` matches the parameter's pattern with ``n`` in 1..60 (the
  constraints the document states in text and patterns);
* a 2xx answer has a status the operation declares and a body valid against its schema; an error
  answer is ``application/problem+json`` with a ``detail`` and a matching ``status``;
* a webhook body validates against ``schemas_prediction_response`` ("the request body is the same as
  the response body of the get prediction operation") and carries the Standard Webhooks headers.

OpenAPI 3.0 is turned into JSON Schema: ``$ref`` resolved, ``nullable`` as ``anyOf [.., null]``, and
``oneOf`` read as ``anyOf`` (the document's ``version`` is ``oneOf [string, enum ["hidden"]]``, which
``"hidden"`` matches twice). ``jsonschema`` is imported on use: the fake itself does not need it.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

SPEC_FILE = Path(__file__).with_name("replicate-openapi.json")
CANCEL_AFTER_MIN_S = 5.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Exchange:
    """One recorded HTTP exchange (header names lower-cased)."""

    kind: Literal["api", "webhook"]
    method: str
    path: str
    """Request path for ``api``; the target URL for ``webhook``."""
    request_headers: dict[str, str]
    request_body: bytes
    status: int
    response_headers: dict[str, str]
    response_body: bytes


def duration_seconds(value: str) -> float | None:
    """A ``Cancel-After`` duration in seconds (``1h30m``, ``500ms``, ``30s``, bare seconds)."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                return None
            seconds += float(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            return None
    return seconds if math.isfinite(seconds) else None


def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _is_uri(value: object) -> bool:
    if not isinstance(value, str):
        return True
    parsed = urlparse(value)
    return bool(parsed.scheme) and bool(parsed.netloc or parsed.path)


class OpenApiChecker:
    """Validates exchanges against the document's operations and schemas."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.base = urlparse(spec["servers"][0]["url"]).path.rstrip("/")
        self.operations: list[tuple[str, re.Pattern[str], str, dict[str, Any]]] = []
        for template, item in spec["paths"].items():
            regex = re.sub(
                r"\{[^/}]+\}", "[^/]+", re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
            )
            pattern = re.compile(f"^{re.escape(self.base)}{regex}$")
            for method, op in item.items():
                if isinstance(op, dict) and "responses" in op:
                    self.operations.append((method.upper(), pattern, template, op))

    @classmethod
    @functools.cache
    def load(cls) -> OpenApiChecker:
        """The checker of the bundled document (cached)."""
        return cls(json.loads(SPEC_FILE.read_text(encoding="utf-8")))

    # ---- schemas ----

    def _resolve(self, ref: str) -> Any:
        node: Any = self.spec
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    def json_schema(self, node: Any) -> Any:
        """OpenAPI 3.0 schema -> JSON Schema (refs inlined, nullable, oneOf as anyOf)."""
        if isinstance(node, list):
            return [self.json_schema(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return self.json_schema(self._resolve(node["$ref"]))
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("nullable", "example", "description", "x-order"):
                continue
            if key == "oneOf":
                out["anyOf"] = self.json_schema(value)
            elif key == "properties" and isinstance(value, dict):
                out[key] = {k: self.json_schema(v) for k, v in value.items()}
            else:
                out[key] = self.json_schema(value)
        if node.get("nullable") is True:
            return {"anyOf": [out, {"type": "null"}]}
        return out

    def validate(self, instance: Any, schema: Any, where: str) -> list[str]:
        """Schema errors of ``instance`` (empty when valid)."""
        import jsonschema

        checker = jsonschema.FormatChecker(formats=())
        checker.checks("date-time")(_is_datetime)
        checker.checks("uri")(_is_uri)
        validator = jsonschema.Draft7Validator(self.json_schema(schema), format_checker=checker)
        return [
            f"{where}: {'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in validator.iter_errors(instance)
        ]

    # ---- exchanges ----

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
        """``(template, operation)`` of a request, or None when the document has no such route."""
        for m, pattern, template, op in self.operations:
            if m == method and pattern.match(path):
                return template, op
        return None

    def check(self, e: Exchange) -> list[str]:
        """Problems of one exchange (empty when it follows the document)."""
        if e.kind == "webhook":
            return self._check_webhook(e)
        found = self.operation(e.method, e.path)
        where = f"{e.method} {e.path}"
        if found is None:
            return [f"{where}: no such operation in the OpenAPI document"]
        _template, op = found
        problems = self._check_request(e, op, where)
        problems += self._check_response(e, op, where)
        return problems

    def check_all(self, exchanges: list[Exchange]) -> list[str]:
        """Problems of every exchange."""
        return [p for e in exchanges for p in self.check(e)]

    def _check_request(self, e: Exchange, op: dict[str, Any], where: str) -> list[str]:
        problems: list[str] = []
        names = {
            (p.get("name") or self._resolve(p["$ref"]).get("name", "")).lower()
            if isinstance(p, dict)
            else ""
            for p in op.get("parameters", [])
        }
        for p in op.get("parameters", []):
            param = self._resolve(p["$ref"]) if "$ref" in p else p
            if param.get("in") != "header":
                continue
            name = str(param["name"]).lower()
            value = e.request_headers.get(name)
            if value is None:
                continue
            pattern = param.get("schema", {}).get("pattern")
            if pattern and not re.match(pattern, value):
                problems.append(f"{where}: header {name}: {value!r} does not match {pattern}")
            if name == "prefer":
                m = re.match(r"^wait=(\d+)$", value)
                if m and not 1 <= int(m.group(1)) <= 60:
                    problems.append(f"{where}: Prefer wait must be 1..60, got {value!r}")
            if name == "cancel-after":
                seconds = duration_seconds(value)
                if seconds is None or seconds < CANCEL_AFTER_MIN_S:
                    problems.append(f"{where}: Cancel-After {value!r} is under the 5 s minimum")
        problems.extend(
            f"{where}: header {header} is not a parameter of this operation"
            for header in ("cancel-after", "prefer")
            if header in e.request_headers and header not in names
        )
        body_spec = op.get("requestBody", {}).get("content", {}).get("application/json")
        if body_spec is not None and e.request_body:
            try:
                body = json.loads(e.request_body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return [*problems, f"{where}: request body is not JSON"]
            problems += self.validate(body, body_spec["schema"], f"{where} request")
        return problems

    def _check_response(self, e: Exchange, op: dict[str, Any], where: str) -> list[str]:
        if e.status >= 400:
            ctype = e.response_headers.get("content-type", "")
            if not ctype.startswith("application/problem+json"):
                return [f"{where}: {e.status} answered as {ctype!r}, not problem+json"]
            try:
                body = json.loads(e.response_body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return [f"{where}: {e.status} body is not JSON"]
            problems = []
            if not isinstance(body, dict) or not isinstance(body.get("detail"), str):
                problems.append(f"{where}: problem without a detail string")
            elif "status" in body and body["status"] != e.status:
                problems.append(f"{where}: problem status {body['status']} != {e.status}")
            return problems
        declared = op["responses"].get(str(e.status))
        if declared is None:
            return [f"{where}: status {e.status} not declared ({sorted(op['responses'])})"]
        content = declared.get("content", {}).get("application/json")
        if content is None:
            return []
        try:
            body = json.loads(e.response_body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return [f"{where}: response body is not JSON"]
        return self.validate(body, content["schema"], f"{where} response")

    def _check_webhook(self, e: Exchange) -> list[str]:
        where = f"webhook {urlparse(e.path).path}"
        problems = [
            f"{where}: missing header {h}"
            for h in ("webhook-id", "webhook-timestamp", "webhook-signature")
            if h not in e.request_headers
        ]
        try:
            body = json.loads(e.request_body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return [*problems, f"{where}: body is not JSON"]
        schema = {"$ref": "#/components/schemas/schemas_prediction_response"}
        return problems + self.validate(body, schema, where)
