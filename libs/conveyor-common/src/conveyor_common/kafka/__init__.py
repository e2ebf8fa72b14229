"""Kafka for Conveyor: one envelope, an idempotent producer, a consumer with manual commit and DLQ."""

from conveyor_common.kafka.consumer import (
    ConsumerConfig,
    Deduplicator,
    EventConsumer,
    Handler,
    PermanentError,
)
from conveyor_common.kafka.envelope import (
    DecodeError,
    Envelope,
    TypeRegistry,
    decode,
    default_registry,
    encode,
)
from conveyor_common.kafka.producer import EventProducer, ProducerConfig

__all__ = [
    "ConsumerConfig",
    "DecodeError",
    "Deduplicator",
    "Envelope",
    "EventConsumer",
    "EventProducer",
    "Handler",
    "PermanentError",
    "ProducerConfig",
    "TypeRegistry",
    "decode",
    "default_registry",
    "encode",
]
