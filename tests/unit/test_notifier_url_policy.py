"""The SSRF URL policy (conveyor_common.ssrf) that the scheduler applies at registration and the
notifier at connect time: syntax, address classes, allow-list, resolution."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import pytest

from conveyor_common.ssrf import (
    AllowList,
    RefusalReason,
    UrlRefused,
    address_refusal,
    check_addresses,
    check_url,
    parse_url,
)


def resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> Sequence[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return table[host]

    return resolve


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "10.1.2.3",
        "172.31.0.1",
        "192.168.0.1",
        "100.64.0.1",
        "100.127.255.254",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.251",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "198.18.0.1",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::127.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::",
        "fc00::1",
        "fd00:ec2::254",
        "fe80::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", RefusalReason.SYNTAX),
        ("https://" + "a" * 2100 + ".com/", RefusalReason.SYNTAX),
        ("https://exämple.com/", RefusalReason.SYNTAX),
        ("https://example.com/a b", RefusalReason.SYNTAX),
        ("https://example.com\\@evil/", RefusalReason.SYNTAX),
        ("ftp://example.com/", RefusalReason.SCHEME),
        ("javascript:alert(1)", RefusalReason.SCHEME),
        ("https://user@example.com/", RefusalReason.USERINFO),
        ("https://:@example.com/", RefusalReason.USERINFO),
        ("https://127.1/", RefusalReason.AMBIGUOUS_IP),
        ("https://0x7f.0.0.1/", RefusalReason.AMBIGUOUS_IP),
        ("https://2130706433/", RefusalReason.AMBIGUOUS_IP),
        ("https://017700000001/", RefusalReason.AMBIGUOUS_IP),
        ("https://[fe80::1%25eth0]/", RefusalReason.SYNTAX),
        ("https://exa_mple.com/", RefusalReason.SYNTAX),
        ("https://example.com:99999/", RefusalReason.SYNTAX),
        ("https:///path", RefusalReason.SYNTAX),
    ],
)
def test_syntax_refusals(url: str, reason: RefusalReason) -> None:
    with pytest.raises(UrlRefused) as info:
        parse_url(url)
    assert info.value.reason is reason


def test_parse_normalizes_host_and_port() -> None:
    target = parse_url("https://Hooks.Example.COM./cb?x=1")
    assert (target.host, target.port, target.literal) == ("hooks.example.com", 443, None)
    assert parse_url("https://[2606:4700::1111]:8443/").literal == ipaddress.ip_address(
        "2606:4700::1111"
    )


async def test_every_resolved_address_must_be_public() -> None:
    table = {
        "good.test": ["93.184.216.34", "2606:4700::1111"],
        "mixed.test": ["93.184.216.34", "10.0.0.7"],
        "mapped.test": ["::ffff:169.254.169.254"],
        "empty.test": [],
    }
    resolved = await check_url("https://good.test/x", AllowList(), resolver(table))
    assert [str(a) for a in resolved.addresses] == ["93.184.216.34", "2606:4700::1111"]
    for host in ("mixed.test", "mapped.test"):
        with pytest.raises(UrlRefused) as info:
            await check_url(f"https://{host}/x", AllowList(), resolver(table))
        assert info.value.reason is RefusalReason.FORBIDDEN_ADDRESS
    for host in ("empty.test", "missing.test"):
        with pytest.raises(UrlRefused) as info:
            await check_url(f"https://{host}/x", AllowList(), resolver(table))
        assert info.value.reason is RefusalReason.UNRESOLVABLE


async def test_temporary_dns_failure_is_not_a_refusal_of_the_url() -> None:
    async def broken(host: str, port: int) -> Sequence[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "try again")

    with pytest.raises(UrlRefused) as info:
        await check_url("https://flaky.test/", AllowList(), broken)
    assert info.value.reason is RefusalReason.RESOLVER_UNAVAILABLE


async def test_allow_list_lets_listed_hosts_through_and_over_http() -> None:
    allow = AllowList.parse(["127.0.0.1", " receiver.test ", "10.9.0.0/16"])
    table = {"receiver.test": ["127.0.0.1", "::1"], "other.test": ["10.9.1.1"]}
    assert (await check_url("http://127.0.0.1:8080/h", allow)).addresses
    assert (await check_url("http://receiver.test/h", allow, resolver(table))).addresses
    assert (await check_url("http://other.test/h", allow, resolver(table))).addresses
    for url in ("https://127.0.0.2/", "https://[::1]/", "http://8.8.8.8/"):
        with pytest.raises(UrlRefused):
            await check_url(url, allow)
    # Empty allow-list: plain http is refused before any DNS lookup.
    with pytest.raises(UrlRefused) as info:
        await check_url("http://receiver.test/", AllowList(), resolver(table))
    assert info.value.reason is RefusalReason.SCHEME


def test_allow_list_parsing() -> None:
    allow = AllowList.parse(["LocalHost.", "::1", "192.168.0.0/24", ""])
    assert allow.permits_host("localhost")
    assert allow.permits_address(ipaddress.ip_address("192.168.0.77"))
    assert allow.permits_address(ipaddress.ip_address("::1"))
    assert not allow.permits_address(ipaddress.ip_address("192.168.1.1"))
    assert not AllowList()
    with pytest.raises(ValueError, match="not a hostname"):
        AllowList.parse(["http://x/"])


def test_check_addresses_names_the_reason() -> None:
    target = parse_url("https://metadata.test/")
    with pytest.raises(UrlRefused, match="cloud metadata"):
        check_addresses(target, ["169.254.169.254"], AllowList())
