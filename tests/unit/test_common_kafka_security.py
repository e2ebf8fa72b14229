"""Kafka client security from settings: names, validation at start, and what every client gets."""

from __future__ import annotations

import ssl
import sys
import textwrap
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor_common.kafka import (
    PLAINTEXT,
    ConsumerConfig,
    EventConsumer,
    EventProducer,
    KafkaSecurity,
    KafkaSecurityError,
    KafkaSecuritySettings,
    ProducerConfig,
    TypeRegistry,
)
from conveyor_common.kafka import consumer as consumer_module
from conveyor_common.kafka import producer as producer_module
from conveyor_common.kafka.security import explain_connect_failure, security_env
from conveyor_common.settings import ServiceSettings, load_settings
from conveyor_devstack.tls import ThrowawayCA
from conveyor_notifier import broadcast as broadcast_module
from conveyor_notifier.broadcast import EventBroadcaster
from conveyor_notifier.fanout import WatchHub
from conveyor_notifier.settings import NotifierSettings
from conveyor_provider_adapter.settings import AdapterSettings
from conveyor_scheduler.settings import SchedulerSettings

FIELDS = (
    "SECURITY_PROTOCOL",
    "SASL_MECHANISM",
    "SASL_USERNAME",
    "SASL_PASSWORD",
    "SASL_PASSWORD_FILE",
    "SASL_OAUTH_TOKEN_PROVIDER",
    "SSL_CAFILE",
    "SSL_CERTFILE",
    "SSL_KEYFILE",
)


class DemoSettings(KafkaSecuritySettings, ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_", frozen=True, extra="ignore")


def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FIELDS:
        monkeypatch.delenv(f"DEMO_KAFKA_{name}", raising=False)


def _env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    _clean(monkeypatch)
    for key, value in values.items():
        monkeypatch.setenv(f"DEMO_KAFKA_{key.upper()}", value)


def _errors(monkeypatch: pytest.MonkeyPatch, **values: str) -> str:
    _env(monkeypatch, **values)
    with pytest.raises(ValidationError) as failed:
        DemoSettings()
    return str(failed.value)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCA:
    return ThrowawayCA(tmp_path_factory.mktemp("ca"))


@pytest.mark.parametrize(
    ("cls", "prefix"),
    [
        (SchedulerSettings, "SCHEDULER_"),
        (AdapterSettings, "ADAPTER_"),
        (NotifierSettings, "NOTIFIER_"),
    ],
)
def test_every_kafka_service_has_the_security_settings_under_its_prefix(
    cls: type[BaseSettings], prefix: str
) -> None:
    assert cls.model_config.get("env_prefix") == prefix
    names = {(prefix + name).upper() for name in cls.model_fields}
    assert {f"{prefix}KAFKA_{name}" for name in FIELDS} <= names
    for name in ("kafka_sasl_password", "kafka_sasl_password_file"):
        assert cls.model_fields[name].default is None  # optional, and no default secret


def test_the_default_is_plaintext_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean(monkeypatch)
    settings = DemoSettings()
    assert settings.kafka_security == PLAINTEXT
    assert settings.kafka_security.client_kwargs() == {"security_protocol": "PLAINTEXT"}


def test_scram_over_tls_with_a_password_file_and_a_private_ca(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: ThrowawayCA
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    _env(
        monkeypatch,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password_file=str(secret),
        ssl_cafile=str(ca.cafile),
    )
    security = DemoSettings().kafka_security
    kwargs = security.client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "svc"
    assert kwargs["sasl_plain_password"] == "s3cret"  # the trailing newline is not part of it
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("organizationName", "Conveyor devstack"),), (("commonName", "Conveyor devstack CA"),))
    ]
    assert security.client_kwargs()["ssl_context"] is context  # one context for every client
    assert "s3cret" not in repr(security)
    assert security.describe() == "SASL_SSL SCRAM-SHA-512 user=svc"


def test_plain_and_scram_256_over_sasl_plaintext(monkeypatch: pytest.MonkeyPatch) -> None:
    for mechanism in ("PLAIN", "SCRAM-SHA-256"):
        _env(
            monkeypatch,
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism=mechanism,
            sasl_username="u",
            sasl_password="p",
        )
        kwargs = DemoSettings().kafka_security.client_kwargs()
        assert kwargs == {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": mechanism,
            "sasl_plain_username": "u",
            "sasl_plain_password": "p",
        }


def test_mutual_tls_loads_the_client_certificate(
    monkeypatch: pytest.MonkeyPatch, ca: ThrowawayCA
) -> None:
    client = ca.issue("client", hosts=(), client=True)
    _env(
        monkeypatch,
        security_protocol="SSL",
        ssl_cafile=str(ca.cafile),
        ssl_certfile=str(client.certfile),
        ssl_keyfile=str(client.keyfile),
    )
    security = DemoSettings().kafka_security
    kwargs = security.client_kwargs()
    assert set(kwargs) == {"security_protocol", "ssl_context"}
    assert security.describe() == "SSL client-cert"
    # The certificate and key also load as one bundle file (no key file).
    _env(monkeypatch, security_protocol="SSL", ssl_certfile=str(client.bundle))
    assert DemoSettings().kafka_security.ssl_certfile == str(client.bundle)


def test_a_certificate_that_does_not_load_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: ThrowawayCA
) -> None:
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate\n")
    message = _errors(monkeypatch, security_protocol="SSL", ssl_certfile=str(garbage))
    assert f"cannot load the certificate {garbage}" in message
    other = ThrowawayCA(tmp_path / "other").issue("client", client=True)
    client = ca.issue("client2", client=True)
    message = _errors(
        monkeypatch,
        security_protocol="SSL",
        ssl_certfile=str(client.certfile),
        ssl_keyfile=str(other.keyfile),  # the key of another certificate
    )
    assert "cannot load the certificate" in message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"sasl_mechanism": "SCRAM-SHA-512"},
            "DEMO_KAFKA_SASL_MECHANISM SCRAM-SHA-512 needs DEMO_KAFKA_SECURITY_PROTOCOL "
            "SASL_PLAINTEXT or SASL_SSL (is PLAINTEXT)",
        ),
        (
            {"security_protocol": "SASL_SSL"},
            "DEMO_KAFKA_SECURITY_PROTOCOL SASL_SSL needs DEMO_KAFKA_SASL_MECHANISM",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
            "needs DEMO_KAFKA_SASL_PASSWORD or DEMO_KAFKA_SASL_PASSWORD_FILE",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_password": "p"},
            "DEMO_KAFKA_SASL_MECHANISM PLAIN needs DEMO_KAFKA_SASL_USERNAME",
        ),
        (
            {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "u",
                "sasl_password": "p",
                "sasl_password_file": "/etc/hostname",
            },
            "set DEMO_KAFKA_SASL_PASSWORD or DEMO_KAFKA_SASL_PASSWORD_FILE, not both",
        ),
        (
            {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-256",
                "sasl_username": "u",
                "sasl_password_file": "/nonexistent/password",
            },
            "DEMO_KAFKA_SASL_PASSWORD_FILE: cannot read /nonexistent/password",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
            "OAUTHBEARER needs DEMO_KAFKA_SASL_OAUTH_TOKEN_PROVIDER",
        ),
        (
            {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "OAUTHBEARER",
                "sasl_oauth_token_provider": "no_such_module_here:provider",
            },
            "DEMO_KAFKA_SASL_OAUTH_TOKEN_PROVIDER: cannot import 'no_such_module_here'",
        ),
        (
            {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "OAUTHBEARER",
                "sasl_oauth_token_provider": "no-colon",
            },
            "must look like 'package.module:attribute'",
        ),
        (
            {"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"},
            "DEMO_KAFKA_SSL_CAFILE /nonexistent/ca.pem does not exist",
        ),
        (
            {"ssl_cafile": "/etc/hostname"},
            "DEMO_KAFKA_SSL_CAFILE is set but DEMO_KAFKA_SECURITY_PROTOCOL PLAINTEXT does not "
            "use TLS",
        ),
        (
            {"security_protocol": "SSL", "ssl_keyfile": "/etc/hostname"},
            "DEMO_KAFKA_SSL_KEYFILE is set without DEMO_KAFKA_SSL_CERTFILE",
        ),
        ({"security_protocol": "TLS"}, "kafka_security_protocol\n  Input should be 'PLAINTEXT'"),
        ({"sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism\n  Input should be 'PLAIN'"),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    assert expected in _errors(monkeypatch, **env)


def test_load_settings_exits_2_with_the_problems(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _env(monkeypatch, security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512")
    with pytest.raises(SystemExit) as exited:
        load_settings(DemoSettings)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "DemoSettings: invalid configuration:" in err
    assert "  Kafka security:" in err
    assert "    - DEMO_KAFKA_SASL_MECHANISM SCRAM-SHA-512 needs DEMO_KAFKA_SASL_USERNAME" in err
    assert "Value error" not in err


PROVIDER_MODULE = """
from aiokafka.abc import AbstractTokenProvider


class Provider(AbstractTokenProvider):
    created = 0

    def __init__(self) -> None:
        Provider.created += 1

    async def token(self) -> str:
        return "a-token"


def factory() -> Provider:
    return Provider()


INSTANCE = Provider()


def not_a_provider() -> str:
    return "nope"
"""


def test_oauthbearer_token_provider_hook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "kafka_token_hook.py").write_text(textwrap.dedent(PROVIDER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kafka_token_hook", raising=False)
    base = {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"}
    for path in ("kafka_token_hook:Provider", "kafka_token_hook:factory"):
        _env(monkeypatch, **base, sasl_oauth_token_provider=path)
        settings = DemoSettings()
        security = settings.kafka_security
        assert security is settings.kafka_security  # created once, shared by every client
        kwargs = security.client_kwargs()
        assert type(kwargs["sasl_oauth_token_provider"]).__name__ == "Provider"
        assert kwargs["sasl_mechanism"] == "OAUTHBEARER"
        assert "sasl_plain_username" not in kwargs
    module = sys.modules["kafka_token_hook"]
    _env(monkeypatch, **base, sasl_oauth_token_provider="kafka_token_hook:INSTANCE")
    assert DemoSettings().kafka_security.token_provider is module.INSTANCE

    _env(monkeypatch, **base, sasl_oauth_token_provider="kafka_token_hook:not_a_provider")
    with pytest.raises(
        KafkaSecurityError, match="gave a str, not an aiokafka AbstractTokenProvider"
    ):
        _ = DemoSettings().kafka_security
    message = _errors(
        monkeypatch,
        **base,
        sasl_oauth_token_provider="kafka_token_hook:Provider",
        sasl_username="u",
    )
    assert "OAUTHBEARER takes no" in message


def test_security_value_checks_itself() -> None:
    with pytest.raises(
        KafkaSecurityError, match="SASL mechanism SCRAM-SHA-512 needs SASL username"
    ):
        KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_password="p")


def test_security_env_round_trips_through_a_service_settings_class(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: ThrowawayCA
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    security = KafkaSecurity(
        protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="conveyor",
        sasl_password="pw",
        ssl_cafile=str(ca.cafile),
    )
    env = security_env("DEMO_", security, password_file=secret)
    assert "DEMO_KAFKA_SASL_PASSWORD" not in env
    _clean(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert DemoSettings().kafka_security == security


class _Recorder:
    """Stands in for an aiokafka client class and records its keyword arguments."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> object:
        self.calls.append(kwargs)
        return object()


def test_every_client_gets_the_security(monkeypatch: pytest.MonkeyPatch) -> None:
    security = KafkaSecurity(
        protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p"
    )
    expected = security.client_kwargs()
    producer, consumer, admin = _Recorder(), _Recorder(), _Recorder()
    monkeypatch.setattr(producer_module, "AIOKafkaProducer", producer)
    monkeypatch.setattr(consumer_module, "AIOKafkaConsumer", consumer)
    monkeypatch.setattr(broadcast_module, "AIOKafkaConsumer", consumer)
    monkeypatch.setattr(broadcast_module, "AIOKafkaAdminClient", admin)

    dlq = EventProducer(ProducerConfig("h:1", "c", security=security), source="/t")
    EventConsumer(
        ConsumerConfig("h:1", "g", ["t"], security=security),
        handler=_noop,
        registry=TypeRegistry(),
        dlq_producer=dlq,
    )
    EventBroadcaster(
        bootstrap_servers="h:1",
        topic="t",
        hub=cast(WatchHub, None),
        client_id="w",
        security=security,
    )
    calls = producer.calls + consumer.calls + admin.calls
    assert len(calls) == 4
    for kwargs in calls:
        assert {k: kwargs[k] for k in expected} == expected


async def _noop(_: object) -> None:
    return None


async def test_a_refused_connection_is_explained() -> None:
    from conveyor_devstack._process import free_ports

    port = free_ports(1)[0]
    reason = await explain_connect_failure(f"127.0.0.1:{port}", PLAINTEXT, timeout_ms=2000)
    assert (
        reason == f"127.0.0.1:{port}: connection refused (nothing listens there, or the wrong port)"
    )
