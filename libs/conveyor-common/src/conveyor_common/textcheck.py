"""Strings a service cannot store: NUL, unpaired surrogates, over-deep or over-wide JSON.

PostgreSQL refuses U+0000 in ``text`` and in ``jsonb`` (``\\u0000``), so a NUL anywhere in a request
used to travel to the scheduler and come back as INTERNAL. :func:`text_violations` walks *every*
string of a protobuf message by its descriptor (scalar and repeated strings, map keys and values,
nested messages, and ``google.protobuf.Struct``/``Value``/``ListValue`` keys and values at any depth)
and names each bad one with the same paths the gateway's rule tables use (``items[3].spec.input.prompt``,
``spec.labels["env"]``, ``spec.input["a b"][2]``). It also bounds JSON documents (``Struct``): their
nesting depth and their number of keys and list items over all levels. The depth bound also keeps
a forwarded task parseable: protobuf's parsers stop at 100 message levels, a JSON object level costs
three of them (Struct, map entry, Value), and a task travels wrapped in more messages than it arrived
in (a SubmitTaskGroupRequest, an event envelope), so a document that parsed at the gateway could fail
to parse downstream.

Protobuf's runtime refuses invalid UTF-8 in proto3 strings while parsing, so an unpaired surrogate
cannot normally arrive (its bytes fail the parse, answered INVALID_ARGUMENT "malformed request");
the check here is the second line for messages built in-process. The walk is iterative (no recursion
limit to hit) and visits each value once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from conveyor_common.errors import FieldViolation

NUL_MESSAGE = "must not contain NUL characters (U+0000)"
SURROGATE_MESSAGE = "must not contain unpaired surrogate code points (U+D800-U+DFFF)"
DEFAULT_MAX_DEPTH = 20
DEFAULT_MAX_NODES = 10_000

_SURROGATE = re.compile("[\ud800-\udfff]")
_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name
_VALUE = struct_pb2.Value.DESCRIPTOR.full_name
_LIST = struct_pb2.ListValue.DESCRIPTOR.full_name


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored, or None."""
    if "\x00" in value:
        return NUL_MESSAGE
    if _SURROGATE.search(value):
        return SURROGATE_MESSAGE
    return None


def _key_path(path: str, key: str) -> str:
    """``path.key`` for identifier-like keys, else ``path["key"]`` (JSON-escaped, NUL visible)."""
    if _SIMPLE_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@dataclass(frozen=True)
class JsonBounds:
    """Bounds of every JSON document (``Struct``) in a message."""

    max_depth: int = DEFAULT_MAX_DEPTH
    """Deepest nesting: a value whose path has more keys/indices than this is refused."""
    max_nodes: int = DEFAULT_MAX_NODES
    """Most keys and list items in one document, over all levels."""


def text_violations(
    message: Message, bounds: JsonBounds | None = None, prefix: str = ""
) -> list[FieldViolation]:
    """Every unstorable string of ``message`` (and over-deep/over-wide JSON), each named."""
    limits = bounds or JsonBounds()
    out: list[FieldViolation] = []
    seen: set[str] = set()

    def bad(path: str, description: str) -> None:
        if path not in seen:
            seen.add(path)
            out.append(FieldViolation(field=path, description=description))

    for path, value in _strings(message, prefix, limits, bad):
        problem = text_problem(value)
        if problem is not None:
            bad(path, problem)
    return out


def merge_violations(
    text: list[FieldViolation], others: list[FieldViolation], urls: list[tuple[str, Any]]
) -> tuple[list[FieldViolation], list[tuple[str, Any]]]:
    """``text`` violations first, then the ``others`` on fields ``text`` did not name (a NUL in a
    request id should be called a NUL, not a bad format); URLs on named fields are not resolved."""
    named = {v.field for v in text}
    kept = [v for v in others if v.field not in named]
    return text + kept, [(path, url) for path, url in urls if path not in named]


def _strings(
    message: Message, prefix: str, limits: JsonBounds, bad: Any
) -> Iterator[tuple[str, str]]:
    """(path, string) of every string in ``message``; bounds violations go to ``bad``."""
    stack: list[tuple[str, Message]] = [(prefix, message)]
    while stack:
        path, msg = stack.pop()
        name = msg.DESCRIPTOR.full_name
        if name in (_STRUCT, _VALUE, _LIST):
            yield from _json_strings(path, msg, limits, bad)
            continue
        for field, value in msg.ListFields():
            field_path = _join(path, field.name)
            if _is_map(field):
                entry: Any = field.message_type
                value_field = entry.fields_by_name["value"]
                for key in value:
                    key_path = (
                        f"{field_path}[{json.dumps(key)}]"
                        if isinstance(key, str)
                        else f"{field_path}[{key}]"
                    )
                    if isinstance(key, str):
                        yield key_path, key
                    item = value[key]
                    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                        stack.append((key_path, item))
                    elif value_field.type == FieldDescriptor.TYPE_STRING:
                        yield key_path, item
            elif field.type == FieldDescriptor.TYPE_STRING:
                if _is_repeated(field):
                    for i, item in enumerate(value):
                        yield f"{field_path}[{i}]", item
                else:
                    yield field_path, value
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if _is_repeated(field):
                    stack.extend((f"{field_path}[{i}]", item) for i, item in enumerate(value))
                else:
                    stack.append((field_path, value))


def _json_strings(
    path: str, doc: Message, limits: JsonBounds, bad: Any
) -> Iterator[tuple[str, str]]:
    """Keys and string values of one JSON document (a Struct, ListValue or Value), within its
    depth and node bounds; depth counts the keys and indices from the document's root."""
    nodes = 0
    stack: list[tuple[str, int, Message]] = [(path, 0, doc)]
    while stack:
        item_path, depth, node = stack.pop()
        if isinstance(node, struct_pb2.Value):
            kind = node.WhichOneof("kind")
            if kind == "string_value":
                yield item_path, node.string_value
                continue
            if kind == "struct_value":
                node = node.struct_value
            elif kind == "list_value":
                node = node.list_value
            else:
                continue
        if depth > limits.max_depth:
            bad(item_path, f"nested deeper than {limits.max_depth} levels")
            continue
        if isinstance(node, struct_pb2.Struct):
            entries: list[tuple[str, struct_pb2.Value]] = []
            for key, value in node.fields.items():
                child = _key_path(item_path, key)
                yield child, key
                entries.append((child, value))
        else:
            entries = [(f"{item_path}[{i}]", v) for i, v in enumerate(node.values)]  # type: ignore[attr-defined]
        nodes += len(entries)
        if nodes > limits.max_nodes:
            bad(path, f"more than {limits.max_nodes} keys and list items")
            return
        stack.extend((child, depth + 1, value) for child, value in reversed(entries))


def _is_map(field: FieldDescriptor) -> bool:
    entry: Any = field.message_type
    return bool(
        field.type == FieldDescriptor.TYPE_MESSAGE
        and entry is not None
        and entry.GetOptions().map_entry
        and field.is_repeated
    )


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)
