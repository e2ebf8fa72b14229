"""A throwaway certificate authority for the devstack's TLS listeners (made with ``cryptography``).

``make_ca`` creates a CA; ``ca.issue(...)`` a server or client certificate it signs, for loopback
names by default. Keys are EC P-256, unencrypted PKCS#8 PEM (what Kafka's PEM key stores and
Python's ``ssl`` both load), valid for a week: nothing here is meant to outlive a test run.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=7)
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class IssuedCert:
    """Files of one issued certificate."""

    certfile: Path
    """The certificate (PEM)."""
    keyfile: Path
    """Its private key (unencrypted PKCS#8 PEM)."""
    bundle: Path
    """Key followed by the certificate (Kafka's PEM key store format)."""


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Conveyor devstack"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class ThrowawayCA:
    """A self-signed CA in ``directory`` (``ca.pem``) that issues certificates."""

    def __init__(self, directory: Path, common_name: str = "Conveyor devstack CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.name = _name(common_name)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cafile = _write(
            directory / "ca.pem", self.cert.public_bytes(serialization.Encoding.PEM)
        )

    def issue(
        self,
        name: str,
        *,
        hosts: tuple[str, ...] = LOOPBACK_NAMES,
        client: bool = False,
    ) -> IssuedCert:
        """A certificate for ``hosts`` (DNS names or IP addresses) written as ``<name>.pem``,
        ``<name>.key`` and ``<name>-bundle.pem``; ``client`` makes it a TLS client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        alt_names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt_names.append(x509.DNSName(host))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = _pem_key(key)
        return IssuedCert(
            certfile=_write(self.directory / f"{name}.pem", cert_pem),
            keyfile=_write(self.directory / f"{name}.key", key_pem, private=True),
            bundle=_write(self.directory / f"{name}-bundle.pem", key_pem + cert_pem, private=True),
        )
