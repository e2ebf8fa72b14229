"""Unit tests for conveyor_common.standard_webhooks: the published vector, every rejection reason, rotation."""

from __future__ import annotations

import base64

import pytest

from conveyor_common.standard_webhooks import (
    HEADER_ID,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    RejectReason,
    WebhookVerificationError,
    WebhookVerifier,
    decode_secret,
    generate_secret,
    new_message_id,
    sign,
    sign_headers,
    verify,
)

# Published Standard Webhooks / Svix test vector.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
NOW = 1_700_000_000.0
BODY = b'{"id": "p1", "status": "succeeded"}'


def _reason(secrets: str | list[str], headers: dict[str, str], body: bytes = BODY) -> RejectReason:
    with pytest.raises(WebhookVerificationError) as info:
        verify(secrets, headers, body, now=NOW)
    return info.value.reason


def test_published_vector_signs_and_verifies() -> None:
    assert sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIG
    # The prefix is optional on input.
    assert (
        sign(VECTOR_SECRET.removeprefix("whsec_"), VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIG
    )
    headers = {HEADER_ID: VECTOR_ID, HEADER_TIMESTAMP: str(VECTOR_TS), HEADER_SIGNATURE: VECTOR_SIG}
    verified = verify(VECTOR_SECRET, headers, VECTOR_BODY, now=VECTOR_TS)
    assert verified.msg_id == VECTOR_ID
    assert verified.timestamp == VECTOR_TS


def test_headers_are_case_insensitive() -> None:
    secret = generate_secret()
    headers = {k.upper(): v for k, v in sign_headers(secret, BODY, timestamp=int(NOW)).items()}
    assert verify(secret, headers, BODY, now=NOW).timestamp == int(NOW)


@pytest.mark.parametrize("missing", [HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE])
def test_missing_header_rejected(missing: str) -> None:
    secret = generate_secret()
    headers = sign_headers(secret, BODY, timestamp=int(NOW))
    del headers[missing]
    assert _reason(secret, headers) is RejectReason.MISSING_HEADERS
    headers[missing] = "  "
    assert _reason(secret, headers) is RejectReason.MISSING_HEADERS


@pytest.mark.parametrize("bad", ["abc", "1.5", "-10", "1e9", "١٢٣"])
def test_non_integer_timestamp_rejected(bad: str) -> None:
    secret = generate_secret()
    headers = sign_headers(secret, BODY, timestamp=int(NOW))
    headers[HEADER_TIMESTAMP] = bad
    assert _reason(secret, headers) is RejectReason.BAD_TIMESTAMP


def test_tolerance_is_300_seconds_both_ways() -> None:
    secret = generate_secret()
    for offset in (-300, 0, 300):
        ok = sign_headers(secret, BODY, timestamp=int(NOW) + offset)
        assert verify(secret, ok, BODY, now=NOW).timestamp == int(NOW) + offset
    old = sign_headers(secret, BODY, timestamp=int(NOW) - 301)
    assert _reason(secret, old) is RejectReason.STALE
    future = sign_headers(secret, BODY, timestamp=int(NOW) + 301)
    assert _reason(secret, future) is RejectReason.FUTURE


def test_tampering_is_rejected() -> None:
    secret = generate_secret()
    headers = sign_headers(secret, BODY, timestamp=int(NOW))
    flipped = bytearray(BODY)
    flipped[5] ^= 0x01
    assert _reason(secret, headers, bytes(flipped)) is RejectReason.BAD_SIGNATURE
    # A different id or timestamp breaks the signature too.
    assert _reason(secret, {**headers, HEADER_ID: "msg_other"}) is RejectReason.BAD_SIGNATURE
    moved = {**headers, HEADER_TIMESTAMP: str(int(NOW) + 1)}
    assert _reason(secret, moved) is RejectReason.BAD_SIGNATURE


def test_wrong_secret_rejected() -> None:
    headers = sign_headers(generate_secret(), BODY, timestamp=int(NOW))
    assert _reason(generate_secret(), headers) is RejectReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "signature",
    [
        "v1",
        "v2,abcd",
        "v1a,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "v1,not base64!",
        "garbage",
    ],
)
def test_malformed_signature_rejected(signature: str) -> None:
    secret = generate_secret()
    headers = sign_headers(secret, BODY, timestamp=int(NOW))
    headers[HEADER_SIGNATURE] = signature
    assert _reason(secret, headers) is RejectReason.MALFORMED_SIGNATURE


def test_well_formed_but_wrong_signature_rejected() -> None:
    secret = generate_secret()
    headers = sign_headers(secret, BODY, timestamp=int(NOW))
    headers[HEADER_SIGNATURE] = "v1," + base64.b64encode(b"\x00" * 32).decode()
    assert _reason(secret, headers) is RejectReason.BAD_SIGNATURE


def test_rotation_sender_signs_with_several_secrets() -> None:
    old, new = generate_secret(), generate_secret()
    headers = sign_headers([new, old], BODY, timestamp=int(NOW))
    entries = headers[HEADER_SIGNATURE].split(" ")
    assert len(entries) == 2
    assert all(e.startswith("v1,") for e in entries)
    # A receiver that knows only one of the two accepts.
    assert verify(old, headers, BODY, now=NOW).msg_id == headers[HEADER_ID]
    assert verify(new, headers, BODY, now=NOW).msg_id == headers[HEADER_ID]
    assert _reason(generate_secret(), headers) is RejectReason.BAD_SIGNATURE


def test_rotation_receiver_accepts_any_of_several_secrets() -> None:
    old, new, other = generate_secret(), generate_secret(), generate_secret()
    verifier = WebhookVerifier([new, old], clock=lambda: NOW)
    for secret in (old, new):
        headers = sign_headers(secret, BODY, timestamp=int(NOW))
        assert verifier.verify(headers, BODY).timestamp == int(NOW)
    with pytest.raises(WebhookVerificationError) as info:
        verifier.verify(sign_headers(other, BODY, timestamp=int(NOW)), BODY)
    assert info.value.reason is RejectReason.BAD_SIGNATURE
    # A good entry among junk entries is still found.
    good = sign_headers(old, BODY, timestamp=int(NOW))
    good[HEADER_SIGNATURE] = "v2,xyz v1,AAAA " + good[HEADER_SIGNATURE]
    assert verifier.verify(good, BODY).msg_id == good[HEADER_ID]


def test_replay_is_not_verifications_business() -> None:
    # Same delivery twice verifies twice: receivers must dedup by webhook-id themselves.
    secret = generate_secret()
    headers = sign_headers(secret, BODY, timestamp=int(NOW))
    assert verify(secret, headers, BODY, now=NOW) == verify(secret, headers, BODY, now=NOW)


def test_secret_validation_and_generation() -> None:
    for bad in ("whsec_", "whsec_***", "not base64 at all"):
        with pytest.raises(ValueError, match="webhook secret"):
            decode_secret(bad)
    with pytest.raises(ValueError, match="at least one"):
        WebhookVerifier([])
    with pytest.raises(ValueError, match=r"24\.\.64"):
        generate_secret(8)
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(decode_secret(secret)) == 32
    assert secret != generate_secret()
    mid = new_message_id()
    assert mid.startswith("msg_")
    assert mid != new_message_id()
