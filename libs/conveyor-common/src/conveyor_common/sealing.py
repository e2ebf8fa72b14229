"""Secrets at rest: AES-256-GCM sealing with named keys, so the key can rotate.

A sealed value is the text ``sealed:v1:<key id>:<base64url(nonce || ciphertext+tag)>``. The key id
is stored with the value, so a keyring that holds the new key (which seals) and the old ones (which
still open) reads everything written before a rotation; ``needs_reseal`` tells which values to
rewrite under the current key. The associated data binds a value to its row (e.g. the endpoint id),
so a sealed secret copied into another row does not open.

Keys come from the environment as ``<key id>:<base64 of 32 bytes>`` entries (comma-separated, the
first one seals), or from a file with one entry per line: :func:`Keyring.parse`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "sealed:v1:"
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_NONCE_BYTES = 12


class SealingError(ValueError):
    """A key or a sealed value is malformed, unknown or does not authenticate."""


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise SealingError("not base64") from exc


class Keyring:
    """AES-256-GCM keys by id; ``current`` seals, every key opens."""

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise SealingError(f"the current key {current!r} is not in the keyring")
        for kid, key in keys.items():
            if not _KEY_ID.match(kid):
                raise SealingError(f"bad key id {kid!r} (letters, digits, _ . -; at most 64)")
            if len(key) != 32:
                raise SealingError(f"key {kid!r} must be 32 bytes (AES-256), not {len(key)}")
        self._aead = {kid: AESGCM(key) for kid, key in keys.items()}
        self.current = current

    @classmethod
    def parse(cls, text: str) -> Keyring:
        """Entries ``<id>:<base64 key>`` separated by commas or new lines; the first one seals."""
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for raw in re.split(r"[,\n]", text):
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            kid, sep, encoded = entry.partition(":")
            if not sep:
                raise SealingError("a key entry is <id>:<base64 of 32 bytes>")
            kid = kid.strip()
            if kid in keys:
                raise SealingError(f"key id {kid!r} appears twice")
            try:
                keys[kid] = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise SealingError(f"key {kid!r} is not base64") from exc
            order.append(kid)
        if not order:
            raise SealingError("no key given")
        return cls(keys, order[0])

    @classmethod
    def from_sources(cls, value: str | None, file: Path | None) -> Keyring | None:
        """The keyring of a variable and/or a file (the variable's keys first), or None."""
        parts = [p for p in (value, file.read_text() if file else None) if p and p.strip()]
        return cls.parse("\n".join(parts)) if parts else None

    @staticmethod
    def generate_entry(kid: str) -> str:
        """A new ``<id>:<base64 key>`` entry (for operators and tests)."""
        return f"{kid}:{base64.b64encode(os.urandom(32)).decode()}"

    def seal(self, plaintext: str, associated: str = "") -> str:
        """``plaintext`` sealed under the current key, bound to ``associated``."""
        nonce = os.urandom(_NONCE_BYTES)
        box = self._aead[self.current].encrypt(
            nonce, plaintext.encode(), self._ad(self.current, associated)
        )
        body = base64.urlsafe_b64encode(nonce + box).decode().rstrip("=")
        return f"{PREFIX}{self.current}:{body}"

    def open(self, sealed: str, associated: str = "") -> str:
        """The plaintext of a sealed value (SealingError if unknown key, tampered or rebound)."""
        if not is_sealed(sealed):
            raise SealingError("not a sealed value")
        kid, sep, body = sealed[len(PREFIX) :].partition(":")
        if not sep:
            raise SealingError("malformed sealed value")
        aead = self._aead.get(kid)
        if aead is None:
            raise SealingError(f"sealed with key {kid!r}, which the keyring does not hold")
        raw = _b64decode(body)
        if len(raw) <= _NONCE_BYTES:
            raise SealingError("malformed sealed value")
        try:
            return aead.decrypt(
                raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._ad(kid, associated)
            ).decode()
        except InvalidTag as exc:
            raise SealingError("sealed value does not authenticate") from exc

    def needs_reseal(self, sealed: str) -> bool:
        """Whether ``sealed`` is plain text or sealed under a key other than the current one."""
        return not is_sealed(sealed) or not sealed.startswith(f"{PREFIX}{self.current}:")

    @staticmethod
    def _ad(kid: str, associated: str) -> bytes:
        return f"conveyor/{kid}/{associated}".encode()


def is_sealed(value: str) -> bool:
    """Whether ``value`` is a sealed value (as opposed to legacy plain text)."""
    return value.startswith(PREFIX)
