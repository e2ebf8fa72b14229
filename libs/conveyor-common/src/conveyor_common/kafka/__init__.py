"""Kafka for Conveyor: one envelope, an idempotent producer, a consumer with manual commit and DLQ,
and the client security (TLS, SASL) every client uses."""

from conveyor_common.kafka.consumer import (
    BatchHandler,
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
from conveyor_common.kafka.security import (
    PLAINTEXT,
    KafkaSecurity,
    KafkaSecurityError,
    KafkaSecuritySettings,
    KafkaStartError,
)

__all__ = [
    "PLAINTEXT",
    "BatchHandler",
    "ConsumerConfig",
    "DecodeError",
    "Deduplicator",
    "Envelope",
    "EventConsumer",
    "EventProducer",
    "Handler",
    "KafkaSecurity",
    "KafkaSecurityError",
    "KafkaSecuritySettings",
    "KafkaStartError",
    "PermanentError",
    "ProducerConfig",
    "TypeRegistry",
    "decode",
    "default_registry",
    "encode",
]
