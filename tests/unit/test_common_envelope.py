"""The Kafka envelope: CloudEvents binary-mode headers around protobuf values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from conveyor.events.v1 import events_pb2
from conveyor_common.context import bound
from conveyor_common.kafka import DecodeError, decode, default_registry, encode


@dataclass
class Record:
    """The attributes of an aiokafka ConsumerRecord that decode() reads."""

    key: bytes | None
    value: Any
    headers: list[tuple[str, bytes]]
    topic: str = "t"
    partition: int = 0
    offset: int = 7


def test_round_trip_keeps_key_type_and_payload() -> None:
    msg = events_pb2.DispatchTask(task_id="t-1", tenant_id="acme", attempt=2, model="a/b")
    with bound(traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"):
        key, value, headers = encode(msg, source="/services/scheduler", key="t-1", event_id="e-1")
    names = dict(headers)
    assert key == b"t-1"
    assert names["ce_specversion"] == b"1.0"
    assert names["ce_id"] == b"e-1"
    assert names["ce_type"] == b"conveyor.events.v1.DispatchTask"
    assert names["ce_source"] == b"/services/scheduler"
    assert names["content-type"] == b"application/protobuf"
    assert names["traceparent"].decode().split("-")[1] == "a" * 32

    env = decode(Record(key, value, headers), default_registry())
    assert env.id == "e-1"
    assert env.key == "t-1"
    assert env.offset == 7
    assert isinstance(env.message, events_pb2.DispatchTask)
    assert env.message.attempt == 2
    assert env.message.model == "a/b"


def test_new_event_ids_are_unique() -> None:
    msg = events_pb2.CancelTask(task_id="x")
    ids = {dict(encode(msg, source="s", key="x")[2])["ce_id"] for _ in range(100)}
    assert len(ids) == 100


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: [x for x in h if x[0] != "ce_id"], "missing header ce_id"),
        (lambda h: [x for x in h if x[0] != "ce_type"], "missing header ce_type"),
        (
            lambda h: [(k, b"9.9" if k == "ce_specversion" else v) for k, v in h],
            "unsupported ce_specversion",
        ),
        (
            lambda h: [(k, b"x.Unknown" if k == "ce_type" else v) for k, v in h],
            "unknown ce_type",
        ),
        (
            lambda h: [(k, b"application/json" if k == "content-type" else v) for k, v in h],
            "unsupported content-type",
        ),
    ],
)
def test_bad_headers_are_decode_errors(mutate: Any, reason: str) -> None:
    key, value, headers = encode(events_pb2.CancelTask(task_id="x"), source="s", key="x")
    with pytest.raises(DecodeError, match=reason):
        decode(Record(key, value, mutate(headers)), default_registry())


def test_garbage_value_is_a_decode_error() -> None:
    key, _, headers = encode(events_pb2.DispatchTask(task_id="x"), source="s", key="x")
    with pytest.raises(DecodeError, match="cannot parse"):
        decode(Record(key, b"\xff\xff\xff\xff", headers), default_registry())
    with pytest.raises(DecodeError, match="no value"):
        decode(Record(key, None, headers), default_registry())
