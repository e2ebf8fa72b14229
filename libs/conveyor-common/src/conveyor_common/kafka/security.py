"""Kafka client security, defined once for every service and every Kafka client.

:class:`KafkaSecuritySettings` is a settings mixin: a service's settings class inherits it and gets,
with its own prefix, ``<PREFIX>KAFKA_SECURITY_PROTOCOL`` (``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT``,
``SASL_SSL``), ``<PREFIX>KAFKA_SASL_MECHANISM`` (``PLAIN``, ``SCRAM-SHA-256``, ``SCRAM-SHA-512``,
``OAUTHBEARER``), ``<PREFIX>KAFKA_SASL_USERNAME``, ``<PREFIX>KAFKA_SASL_PASSWORD`` or
``<PREFIX>KAFKA_SASL_PASSWORD_FILE`` (a secret: no default), ``<PREFIX>KAFKA_SASL_OAUTH_TOKEN_PROVIDER``
(``module:attr``: an aiokafka ``AbstractTokenProvider``, or a callable returning one),
``<PREFIX>KAFKA_SSL_CAFILE``, ``<PREFIX>KAFKA_SSL_CERTFILE`` and ``<PREFIX>KAFKA_SSL_KEYFILE`` (mutual
TLS). The combination is checked at start (a SASL mechanism needs a SASL protocol, a username needs a
password, files must exist and load...) and a bad one stops the service naming the variables.

:class:`KafkaSecurity` is the resolved value: ``client_kwargs()`` gives the keyword arguments every
aiokafka client (producer, consumer, admin) takes. The default is PLAINTEXT, as before.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import ssl
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import KafkaConnectionError
from aiokafka.helpers import create_ssl_context
from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
SECURITY_PROTOCOLS: tuple[str, ...] = get_args(SecurityProtocol)
SASL_MECHANISMS: tuple[str, ...] = get_args(SaslMechanism)
PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class KafkaSecurityError(ValueError):
    """A security configuration that cannot work (the message says why)."""


def uses_sasl(protocol: str) -> bool:
    """Whether ``protocol`` authenticates with SASL."""
    return protocol.startswith("SASL_")


def uses_tls(protocol: str) -> bool:
    """Whether ``protocol`` runs over TLS."""
    return protocol in ("SSL", "SASL_SSL")


def build_ssl_context(
    *, cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """A client TLS context: the broker's certificate is verified (against ``cafile``, else the
    system's CAs) and its host name checked; ``certfile`` (+ ``keyfile``) is the client certificate
    for mutual TLS. Raises :class:`KafkaSecurityError` naming the file that does not load."""
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=cafile, certfile=certfile, keyfile=keyfile
        )
        return context
    except FileNotFoundError as exc:
        raise KafkaSecurityError(f"file not found: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        what = f"CA file {cafile}" if certfile is None else f"certificate {certfile}"
        if certfile is not None and keyfile is not None:
            what += f" / key {keyfile}"
        raise KafkaSecurityError(f"cannot load the {what}: {exc}") from None


def load_token_provider(path: str) -> AbstractTokenProvider:
    """The token provider at ``module:attr`` (``attr`` may be dotted): an ``AbstractTokenProvider``
    instance, or a callable (a class, a factory) returning one when called without arguments."""
    target = resolve_object(path)
    provider = target if isinstance(target, AbstractTokenProvider) else None
    if provider is None:
        if not callable(target):
            raise KafkaSecurityError(
                f"{path} is neither an AbstractTokenProvider nor a callable returning one"
            )
        try:
            provider = target()
        except Exception as exc:
            raise KafkaSecurityError(f"{path}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(provider, AbstractTokenProvider):
        raise KafkaSecurityError(
            f"{path} gave a {type(provider).__name__}, not an aiokafka AbstractTokenProvider"
        )
    return provider


def resolve_object(path: str) -> Any:
    """The object at ``module:attr`` (``attr`` may be dotted); KafkaSecurityError when missing."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise KafkaSecurityError(f"{path!r} must look like 'package.module:attribute'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise KafkaSecurityError(f"cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise KafkaSecurityError(f"{module_name!r} has no attribute {attr!r}") from None
    return target


@dataclass(frozen=True)
class KafkaSecurity:
    """How a Kafka client connects: protocol, SASL credentials, TLS files. Checked on creation."""

    protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    token_provider: AbstractTokenProvider | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        problems = _problems(
            protocol=self.protocol,
            mechanism=self.sasl_mechanism,
            username=self.sasl_username,
            has_password=self.sasl_password is not None,
            has_token_provider=self.token_provider is not None,
            cafile=self.ssl_cafile,
            certfile=self.ssl_certfile,
            keyfile=self.ssl_keyfile,
            names=_PLAIN_NAMES,
        )
        if problems:
            raise KafkaSecurityError("; ".join(problems))

    @cached_property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context (None without TLS); built once and shared by every client."""
        if not uses_tls(self.protocol):
            return None
        return build_ssl_context(
            cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
        )

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``AIOKafkaProducer``, ``AIOKafkaConsumer`` and
        ``AIOKafkaAdminClient``."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if uses_tls(self.protocol):
            kwargs["ssl_context"] = self.ssl_context
        if uses_sasl(self.protocol):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism == "OAUTHBEARER":
                kwargs["sasl_oauth_token_provider"] = self.token_provider
            else:
                kwargs["sasl_plain_username"] = self.sasl_username
                kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs

    def describe(self) -> str:
        """For logs: protocol, mechanism and user, never a secret."""
        parts: list[str] = [self.protocol]
        if self.sasl_mechanism:
            parts.append(self.sasl_mechanism)
        if self.sasl_username:
            parts.append(f"user={self.sasl_username}")
        if self.ssl_certfile:
            parts.append("client-cert")
        return " ".join(parts)


_PLAIN_NAMES = {
    "protocol": "security protocol",
    "mechanism": "SASL mechanism",
    "username": "SASL username",
    "password": "SASL password",
    "password_file": "SASL password file",
    "token_provider": "OAUTHBEARER token provider",
    "cafile": "CA file",
    "certfile": "client certificate",
    "keyfile": "client key",
}


def _problems(
    *,
    protocol: str,
    mechanism: str | None,
    username: str | None,
    has_password: bool,
    has_token_provider: bool,
    cafile: str | None,
    certfile: str | None,
    keyfile: str | None,
    names: dict[str, str],
) -> list[str]:
    """What is wrong with a combination (empty when it can work); ``names`` names the knobs."""
    out: list[str] = []
    n = names
    if protocol not in SECURITY_PROTOCOLS:
        out.append(f"{n['protocol']} must be one of {', '.join(SECURITY_PROTOCOLS)}")
        return out
    if uses_sasl(protocol):
        if mechanism is None:
            out.append(
                f"{n['protocol']} {protocol} needs {n['mechanism']} ({', '.join(SASL_MECHANISMS)})"
            )
        elif mechanism in PASSWORD_MECHANISMS:
            if not username:
                out.append(f"{n['mechanism']} {mechanism} needs {n['username']}")
            if not has_password:
                out.append(
                    f"{n['mechanism']} {mechanism} needs {n['password']} or {n['password_file']}"
                )
            if has_token_provider:
                out.append(f"{n['token_provider']} is only used with OAUTHBEARER, not {mechanism}")
        elif mechanism == "OAUTHBEARER":
            if not has_token_provider:
                out.append(f"{n['mechanism']} OAUTHBEARER needs {n['token_provider']}")
            if username or has_password:
                out.append(
                    f"{n['mechanism']} OAUTHBEARER takes no {n['username']}/{n['password']} "
                    f"(the token provider authenticates)"
                )
    else:
        if mechanism is not None:
            out.append(
                f"{n['mechanism']} {mechanism} needs {n['protocol']} SASL_PLAINTEXT or SASL_SSL "
                f"(is {protocol})"
            )
        if username or has_password or has_token_provider:
            out.append(f"SASL credentials are set but {n['protocol']} {protocol} does not use SASL")
    if not uses_tls(protocol):
        for key, value in (("cafile", cafile), ("certfile", certfile), ("keyfile", keyfile)):
            if value:
                out.append(f"{n[key]} is set but {n['protocol']} {protocol} does not use TLS")
    if keyfile and not certfile:
        out.append(f"{n['keyfile']} is set without {n['certfile']}")
    for key, value in (("cafile", cafile), ("certfile", certfile), ("keyfile", keyfile)):
        if value and not Path(value).is_file():
            out.append(f"{n[key]} {value} does not exist (or is not a file)")
    return out


PLAINTEXT = KafkaSecurity()
"""No TLS, no authentication (the default)."""


class KafkaSecuritySettings(BaseSettings):
    """Settings mixin: Kafka client security with the service's own env prefix (see the module)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", use_attribute_docstrings=True)

    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    """Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."""
    kafka_sasl_mechanism: SaslMechanism | None = None
    """SASL mechanism (SASL protocols only): PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER."""
    kafka_sasl_username: str | None = None
    """SASL username (PLAIN and SCRAM)."""
    kafka_sasl_password: SecretStr | None = None
    """SASL password (secret, no default); or set the password file instead."""
    kafka_sasl_password_file: Path | None = None
    """File holding the SASL password (a mounted secret; one trailing newline is ignored)."""
    kafka_sasl_oauth_token_provider: str | None = None
    """OAUTHBEARER token provider, `module:attr`: an aiokafka AbstractTokenProvider or a callable
    returning one."""
    kafka_ssl_cafile: Path | None = None
    """PEM file of the CA(s) that sign the brokers' certificates (unset = the system's CAs)."""
    kafka_ssl_certfile: Path | None = None
    """PEM client certificate for mutual TLS (may also hold the key)."""
    kafka_ssl_keyfile: Path | None = None
    """PEM private key of the client certificate (when not in the certificate file)."""

    def _kafka_env(self, field_name: str) -> str:
        prefix = str(type(self).model_config.get("env_prefix", ""))
        return (prefix + field_name).upper()

    @model_validator(mode="after")
    def _check_kafka_security(self) -> KafkaSecuritySettings:
        names = {
            "protocol": self._kafka_env("kafka_security_protocol"),
            "mechanism": self._kafka_env("kafka_sasl_mechanism"),
            "username": self._kafka_env("kafka_sasl_username"),
            "password": self._kafka_env("kafka_sasl_password"),
            "password_file": self._kafka_env("kafka_sasl_password_file"),
            "token_provider": self._kafka_env("kafka_sasl_oauth_token_provider"),
            "cafile": self._kafka_env("kafka_ssl_cafile"),
            "certfile": self._kafka_env("kafka_ssl_certfile"),
            "keyfile": self._kafka_env("kafka_ssl_keyfile"),
        }
        problems: list[str] = []
        if self.kafka_sasl_password is not None and self.kafka_sasl_password_file is not None:
            problems.append(f"set {names['password']} or {names['password_file']}, not both")
        elif self.kafka_sasl_password_file is not None:
            try:
                _read_password(self.kafka_sasl_password_file)
            except KafkaSecurityError as exc:
                problems.append(f"{names['password_file']}: {exc}")
        problems += _problems(
            protocol=self.kafka_security_protocol,
            mechanism=self.kafka_sasl_mechanism,
            username=self.kafka_sasl_username,
            has_password=(
                self.kafka_sasl_password is not None or self.kafka_sasl_password_file is not None
            ),
            has_token_provider=self.kafka_sasl_oauth_token_provider is not None,
            cafile=_str(self.kafka_ssl_cafile),
            certfile=_str(self.kafka_ssl_certfile),
            keyfile=_str(self.kafka_ssl_keyfile),
            names=names,
        )
        if self.kafka_sasl_oauth_token_provider is not None:
            try:
                resolve_object(self.kafka_sasl_oauth_token_provider)
            except KafkaSecurityError as exc:
                problems.append(f"{names['token_provider']}: {exc}")
        if not problems and uses_tls(self.kafka_security_protocol):
            try:  # a certificate or key that does not load fails now, not at the first connect
                build_ssl_context(
                    cafile=_str(self.kafka_ssl_cafile),
                    certfile=_str(self.kafka_ssl_certfile),
                    keyfile=_str(self.kafka_ssl_keyfile),
                )
            except KafkaSecurityError as exc:
                problems.append(f"Kafka TLS: {exc}")
        if problems:
            raise ValueError("Kafka security:\n    - " + "\n    - ".join(problems))
        return self

    @cached_property
    def kafka_security(self) -> KafkaSecurity:
        """The resolved security of every Kafka client of the service (built once: the password
        file is read and the token provider created here)."""
        password: str | None = None
        if self.kafka_sasl_password is not None:
            password = self.kafka_sasl_password.get_secret_value()
        elif self.kafka_sasl_password_file is not None:
            password = _read_password(self.kafka_sasl_password_file)
        provider = None
        if self.kafka_sasl_oauth_token_provider is not None:
            provider = load_token_provider(self.kafka_sasl_oauth_token_provider)
        return KafkaSecurity(
            protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=password,
            token_provider=provider,
            ssl_cafile=_str(self.kafka_ssl_cafile),
            ssl_certfile=_str(self.kafka_ssl_certfile),
            ssl_keyfile=_str(self.kafka_ssl_keyfile),
        )


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _read_password(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KafkaSecurityError(f"cannot read {path}: {exc.strerror or exc}") from None
    password = text[:-1] if text.endswith("\n") else text
    if password.endswith("\r"):
        password = password[:-1]
    if not password:
        raise KafkaSecurityError(f"{path} is empty")
    return password


def security_env(
    prefix: str, security: KafkaSecurity, *, password_file: Path | None = None
) -> dict[str, str]:
    """The ``<prefix>KAFKA_*`` variables that give a service ``security`` (for launchers such as the
    devstack's system harness). With ``password_file`` the password goes there, not in the env.
    A token provider cannot be passed this way."""
    env: dict[str, str] = {f"{prefix}KAFKA_SECURITY_PROTOCOL": security.protocol}
    if security.sasl_mechanism:
        env[f"{prefix}KAFKA_SASL_MECHANISM"] = security.sasl_mechanism
    if security.sasl_username:
        env[f"{prefix}KAFKA_SASL_USERNAME"] = security.sasl_username
    if security.sasl_password is not None:
        if password_file is not None:
            env[f"{prefix}KAFKA_SASL_PASSWORD_FILE"] = str(password_file)
        else:
            env[f"{prefix}KAFKA_SASL_PASSWORD"] = security.sasl_password
    for name, value in (
        ("CAFILE", security.ssl_cafile),
        ("CERTFILE", security.ssl_certfile),
        ("KEYFILE", security.ssl_keyfile),
    ):
        if value:
            env[f"{prefix}KAFKA_SSL_{name}"] = value
    return env


class KafkaStartError(KafkaConnectionError):  # type: ignore[misc]
    """A Kafka client could not connect at start; the message says why (refused credentials, an
    untrusted certificate, nothing listening...), not just "Unable to bootstrap"."""


def _hosts(bootstrap: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        if host and port.isdigit():
            out.append((host.strip("[]"), int(port)))
    return out


async def explain_connect_failure(
    bootstrap: str, security: KafkaSecurity, *, timeout_ms: int = 10_000
) -> str:
    """Why a client with ``security`` cannot connect to ``bootstrap``: one connection attempt per
    bootstrap server, the first failure described (``""`` when every attempt succeeded)."""
    from aiokafka.conn import create_conn

    kwargs = security.client_kwargs()
    reasons: list[str] = []
    for host, port in _hosts(bootstrap):
        try:
            conn = await create_conn(
                host,
                port,
                client_id="conveyor-connect-check",
                request_timeout_ms=timeout_ms,
                **kwargs,
            )
        except Exception as exc:  # what the client swallowed into "Unable to bootstrap"
            reasons.append(f"{host}:{port}: {_describe_error(exc)}")
            continue
        conn.close()
    return "; ".join(reasons)


def _describe_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the broker's certificate is not trusted ({exc.verify_message}); check the CA file"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {text}"
    name = type(exc).__name__
    if "Sasl" in name or "Authentication" in name:
        return f"authentication refused: {text}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there, or the wrong port)"
    if isinstance(exc, TimeoutError):
        return "timed out (a TLS or SASL listener spoken to in PLAINTEXT looks like this)"
    return f"{name}: {text}" if name not in text else text


async def start_client(client: Any, bootstrap: str, security: KafkaSecurity, what: str) -> None:
    """``await client.start()``; a connection failure becomes a :class:`KafkaStartError` that names
    the bootstrap servers, the security in use and the cause."""
    try:
        await client.start()
    except KafkaConnectionError as exc:
        with contextlib.suppress(Exception):
            await _close(client)
        reason = await explain_connect_failure(bootstrap, security)
        message = (
            f"{what}: cannot connect to Kafka at {bootstrap} ({security.describe()}): "
            f"{reason or exc}"
        )
        logger.error(message, extra={"action": "kafka_start_failed"})
        raise KafkaStartError(message) from exc


async def _close(client: Any) -> None:
    closer = getattr(client, "stop", None) or getattr(client, "close", None)
    if closer is not None:
        await closer()
