"""Token policy (issue 15): numeric ``exp``/``iat``/``nbf`` and a maximum lifetime.

PyJWT alone accepted ``exp`` as a string (``int("...")``), as 1e30 and without ``iat``. The gateway
requires both dates as finite JSON numbers (booleans and strings refused; non-integer values are legal
NumericDates in RFC 7519 and accepted when in range), ``nbf`` numeric when present, and ``exp - iat``
at most ``GATEWAY_JWT_MAX_LIFETIME_SECONDS``.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from conveyor_common.errors import Unauthenticated
from conveyor_gateway.auth import TokenVerifier
from conveyor_testkit.tokens import AUDIENCE, HS_SECRET, ISSUER

MAX_LIFETIME = 3600


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(
        hs256_secrets=[HS_SECRET], issuer=ISSUER, audience=AUDIENCE,
        leeway_seconds=5, max_lifetime_seconds=MAX_LIFETIME,
    )  # fmt: skip


def token(**dates: Any) -> str:
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc", "tenant_id": "t"}
    claims.update(dates)
    return jwt.encode(claims, HS_SECRET, algorithm="HS256")


class Later:
    """The current time plus ``offset`` in a parameter, read when the test runs (not at collection)."""

    def __init__(self, offset: float = 0) -> None:
        self.offset = offset

    def __add__(self, other: float) -> Later:
        return Later(self.offset + other)

    def __sub__(self, other: float) -> Later:
        return Later(self.offset - other)

    def __repr__(self) -> str:
        return f"NOW{self.offset:+g}"


NOW = Later()


def resolve(dates: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {}
    for key, value in dates.items():
        if isinstance(value, Later):
            value = now + value.offset
        elif isinstance(value, list):
            value = [now + v.offset if isinstance(v, Later) else v for v in value]
        elif value == "NOW+60":
            value = str(now + 60)
        elif value == "NOW":
            value = str(now)
        out[key] = value
    return out


@pytest.mark.parametrize(
    ("dates", "message"),
    [
        ({"iat": NOW, "exp": "NOW+60"}, "exp must be a number"),
        ({"iat": NOW, "exp": "9999999999"}, "exp must be a number"),
        ({"iat": NOW, "exp": 1e30}, "out of range"),
        ({"iat": NOW, "exp": 10**30}, "out of range"),
        ({"iat": NOW, "exp": float("inf")}, "out of range"),
        ({"iat": NOW, "exp": float("nan")}, "out of range"),
        ({"iat": NOW, "exp": True}, "exp must be a number"),
        ({"iat": NOW, "exp": [NOW + 60]}, "exp must be a number"),
        ({"exp": NOW + 60}, "missing iat claim"),
        ({"iat": NOW}, "missing exp claim"),
        ({"iat": "NOW", "exp": NOW + 60}, "iat must be a number"),
        ({"iat": False, "exp": NOW + 60}, "iat must be a number"),
        ({"iat": NOW, "exp": NOW + MAX_LIFETIME + 1}, "lifetime"),
        ({"iat": NOW - 10 * MAX_LIFETIME, "exp": NOW + 60}, "lifetime"),
        ({"iat": NOW + 600, "exp": NOW + 1200}, "issued in the future"),
        ({"iat": NOW + 60, "exp": NOW + 30}, "exp must be after iat"),
        ({"iat": NOW, "exp": NOW + 60, "nbf": "NOW"}, "nbf must be a number"),
        ({"iat": NOW, "exp": NOW + 60, "nbf": NOW + 600}, "not yet valid"),
        ({"iat": NOW - 120, "exp": NOW - 60}, "token expired"),
    ],
)
def test_bad_dates_are_refused(
    verifier: TokenVerifier, dates: dict[str, Any], message: str
) -> None:
    with pytest.raises(Unauthenticated) as exc:
        verifier.verify(token(**resolve(dates)))
    assert message in exc.value.message


@pytest.mark.parametrize(
    "dates",
    [
        {"iat": NOW, "exp": NOW + 60},
        {"iat": NOW, "exp": NOW + MAX_LIFETIME},  # exactly the maximum
        {"iat": NOW + 0.25, "exp": NOW + 60.5},  # non-integer NumericDates (RFC 7519)
        {"iat": NOW, "exp": NOW + 60, "nbf": NOW - 1},
        {"iat": NOW + 3, "exp": NOW + 60},  # within the leeway
    ],
)
def test_good_dates_are_accepted(verifier: TokenVerifier, dates: dict[str, Any]) -> None:
    assert verifier.verify(token(**resolve(dates))).tenant_id == "t"


def test_default_maximum_is_a_day() -> None:
    v = TokenVerifier(hs256_secrets=[HS_SECRET], issuer=ISSUER, audience=AUDIENCE)
    now = int(time.time())
    assert v.verify(token(iat=now, exp=now + 24 * 3600)).tenant_id == "t"
    with pytest.raises(Unauthenticated, match="lifetime"):
        v.verify(token(iat=now, exp=now + 24 * 3600 + 1))


def test_a_sub_claim_with_a_nul_is_refused(verifier: TokenVerifier) -> None:
    dates = resolve({"iat": NOW, "exp": NOW + 60})
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc\x00x", "tenant_id": "t", **dates}
    with pytest.raises(Unauthenticated, match="sub"):
        verifier.verify(jwt.encode(claims, HS_SECRET, algorithm="HS256"))
