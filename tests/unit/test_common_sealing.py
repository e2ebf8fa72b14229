"""Secrets at rest: AES-GCM sealing with key ids, rotation, binding to a row, tamper detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor_common.sealing import Keyring, SealingError, is_sealed


def ring(*entries: str) -> Keyring:
    return Keyring.parse(",".join(entries))


OLD, NEW = Keyring.generate_entry("k2025"), Keyring.generate_entry("k2026")


def test_a_sealed_secret_is_unreadable_and_opens_with_its_row() -> None:
    keys = ring(OLD)
    sealed = keys.seal("whsec_topsecret", "endpoint-1")
    assert is_sealed(sealed)
    assert "topsecret" not in sealed
    assert sealed != keys.seal("whsec_topsecret", "endpoint-1")  # a fresh nonce every time
    assert keys.open(sealed, "endpoint-1") == "whsec_topsecret"
    with pytest.raises(SealingError, match="authenticate"):
        keys.open(sealed, "endpoint-2")  # copied into another row


def test_rotation_new_key_seals_old_keys_still_open() -> None:
    before = ring(OLD).seal("s1", "e")
    rotated = ring(NEW, OLD)
    assert rotated.current == "k2026"
    assert rotated.open(before, "e") == "s1"
    assert rotated.needs_reseal(before)
    after = rotated.seal("s1", "e")
    assert not rotated.needs_reseal(after)
    assert rotated.needs_reseal("legacy plain text")
    with pytest.raises(SealingError, match="does not hold"):
        ring(OLD).open(after, "e")  # a keyring without the new key cannot read it


def test_tampering_is_detected() -> None:
    keys = ring(OLD)
    sealed = keys.seal("s", "e")
    flipped = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    with pytest.raises(SealingError):
        keys.open(flipped, "e")
    for bad in ("plain", "sealed:v1:k2025", "sealed:v1:k2025:!!!", "sealed:v1:k2025:AAAA"):
        with pytest.raises(SealingError):
            keys.open(bad, "e")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no key"),
        ("nokey", "<id>:<base64"),
        ("k1:bm90LTMyLWJ5dGVz", "32 bytes"),
        ("k1:%%%", "not base64"),
        ("bad id!:" + OLD.split(":", 1)[1], "bad key id"),
        (OLD + "," + OLD, "twice"),
    ],
)
def test_bad_keys_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(SealingError, match=message):
        Keyring.parse(text)


def test_keys_from_a_variable_and_a_file(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text(f"# rotated 2026\n{OLD}\n")
    assert Keyring.from_sources(None, None) is None
    both = Keyring.from_sources(NEW, file)
    assert both is not None
    assert both.current == "k2026"
    assert both.open(ring(OLD).seal("x"), "") == "x"
