"""Mutual TLS between Conveyor's services (scheduler, provider adapter, notifier, gateway as client).

The internal gRPC servers trust nobody by network position: with ``<SERVICE>_TLS_CERT_FILE``,
``<SERVICE>_TLS_KEY_FILE`` and ``<SERVICE>_TLS_CA_FILE`` set, a service serves TLS, **requires** a
client certificate signed by the CA, and presents its own certificate when it calls another service
(verifying that service's certificate against the same CA). ``<SERVICE>_TLS_ALLOWED_PEERS`` narrows
who may call: a client whose certificate names none of them (subject alternative DNS names or common
name) is answered PERMISSION_DENIED. Health checks and reflection stay open to any certified peer.

Tenant identity never authorizes an internal call: the principal in an internal request is taken on
the word of a certified peer (the gateway), which is why the certificate is what is checked.
Unset, everything is plaintext (the devstack's default; the prod overlay turns it on).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import grpc
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode

from conveyor_common.errors import PermissionDenied
from conveyor_common.tracing import TraceparentClientInterceptor

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods every certified peer may call whatever ``tls_allowed_peers`` says."""


class InternalTlsSettings(BaseSettings):
    """Mixin of the internal services' settings: their certificate, key and CA."""

    tls_cert_file: Path | None = None
    """Certificate (PEM chain) this service serves and presents to the services it calls; with the
    key and the CA, internal gRPC is mutual TLS."""
    tls_key_file: Path | None = None
    """Private key (PEM) of ``TLS_CERT_FILE``."""
    tls_ca_file: Path | None = None
    """CA bundle (PEM) that signs every Conveyor service's certificate (peers are verified with it)."""
    tls_allowed_peers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Peers (certificate DNS names or common name) allowed to call this service's RPCs; empty = any
    certificate signed by the CA (comma-separated or a JSON list)."""
    tls_server_name: str = ""
    """Name expected in the certificates of the services this one calls, when it differs from the
    host of their address (e.g. addresses given as IPs)."""

    @field_validator("tls_allowed_peers", mode="before")
    @classmethod
    def _split_peers(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _tls_complete(self) -> InternalTlsSettings:
        given = [self.tls_cert_file, self.tls_key_file, self.tls_ca_file]
        if any(v is not None for v in given) and not all(v is not None for v in given):
            raise ValueError("TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE go together")
        for path in given:
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self

    @property
    def internal_tls(self) -> TlsFiles | None:
        """The files, when mutual TLS is on."""
        if self.tls_cert_file is None or self.tls_key_file is None or self.tls_ca_file is None:
            return None
        return TlsFiles(
            self.tls_cert_file,
            self.tls_key_file,
            self.tls_ca_file,
            tuple(self.tls_allowed_peers),
            self.tls_server_name,
        )


class TlsFiles:
    """A service's certificate, key and CA, read when credentials are built."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        ca: Path,
        allowed_peers: Iterable[str] = (),
        server_name: str = "",
    ) -> None:
        self.cert = cert
        self.key = key
        self.ca = ca
        self.allowed_peers = tuple(allowed_peers)
        self.server_name = server_name

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server side: our certificate; clients must present one signed by the CA."""
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes(),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client side: verify the server against the CA and present our certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )

    def channel_options(self) -> list[tuple[str, str | int]]:
        """Extra channel options (the expected server name, when set)."""
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The peer check, when ``allowed_peers`` narrows the callers."""
        return [PeerAllowList(self.allowed_peers)] if self.allowed_peers else []


def open_channel(
    target: str, tls: TlsFiles | None, options: list[tuple[str, str | int]]
) -> grpc.aio.Channel:
    """A channel to another Conveyor service: mutual TLS when ``tls`` is given, else plaintext;
    every call carries the caller's trace context (``traceparent``)."""
    interceptors = [TraceparentClientInterceptor()]
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target,
        tls.channel_credentials(),
        options=[*options, *tls.channel_options()],
        interceptors=interceptors,
    )


def peer_names(context: grpc.aio.ServicerContext[Any, Any]) -> set[str]:
    """DNS names and common name of the calling peer's verified certificate."""
    auth: Any = context.auth_context() or {}
    names: set[str] = set()
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        for value in auth.get(key, ()):
            names.add(value.decode() if isinstance(value, bytes) else str(value))
    return names


class PeerAllowList(grpc.aio.ServerInterceptor):
    """PERMISSION_DENIED for a certified caller not named in the allow-list."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(allowed)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        method: str = getattr(handler_call_details, "method", "")
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        allowed = self.allowed

        def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if not peer_names(context) & allowed:
                raise PermissionDenied(
                    "this peer may not call this service", reason="PEER_NOT_ALLOWED"
                )

        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                check(context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_us: Any = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                check(context)
                async for item in inner_us(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
