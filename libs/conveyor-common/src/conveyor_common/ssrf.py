"""Outbound URL policy against SSRF (reliability.md 3.6), for URLs that callers give us.

Client callback URLs are the riskiest source: they are checked when registered **and** again when
connected to (DNS can change between the two). The policy:

* ``https`` only; ``http`` only for hosts on an explicit allow-list (tests and local runs deliver to
  loopback receivers that cannot present a public certificate).
* No userinfo (``https://good@127.0.0.1``), no backslashes, whitespace, control or non-ASCII
  characters, no percent-encoded or zone-id hosts, at most 2048 characters.
* IP literals only in canonical form: ``127.1``, ``0x7f000001``, ``2130706433`` and
  ``017700000001`` are refused as ambiguous (the C resolver reads them all as 127.0.0.1).
* The host is resolved and **every** address must be public: loopback, private, link-local (cloud
  metadata 169.254.169.254), CGNAT, multicast, reserved, unspecified, documentation, benchmarking,
  IPv4-mapped / -compatible / NAT64 / 6to4 IPv6 and unique-local addresses are refused.
* The allow-list (hostnames, IP addresses, CIDRs; empty by default) lets a listed host or address
  through. The notifier connects to an address this module approved (DNS pinning), never to a
  second resolution of the name.

Pure functions plus one async resolver hook, so the scheduler (registration) and the notifier
(connect time) apply the same rules.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import urlsplit

__all__ = [
    "MAX_URL_LENGTH",
    "AllowList",
    "IPAddress",
    "RefusalReason",
    "ResolvedTarget",
    "Resolver",
    "Target",
    "UrlRefused",
    "address_refusal",
    "check_addresses",
    "check_url",
    "parse_url",
    "system_resolver",
]

MAX_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses`` (strings); raises ``socket.gaierror`` when the name does not resolve."""


class RefusalReason(StrEnum):
    """Why a URL was refused (a stable label for logs and metrics)."""

    SYNTAX = "syntax"
    SCHEME = "scheme"
    USERINFO = "userinfo"
    AMBIGUOUS_IP = "ambiguous_ip"
    FORBIDDEN_ADDRESS = "forbidden_address"
    UNRESOLVABLE = "unresolvable"
    RESOLVER_UNAVAILABLE = "resolver_unavailable"


class UrlRefused(ValueError):
    """The URL may not be called; ``reason`` is a :class:`RefusalReason`."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# Checked in order: the first match names the reason. ``is_global`` below is the catch-all.
_BLOCKED: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified / this network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("::/96", "IPv4-compatible"),
        ("64:ff9b::/96", "NAT64"),
        ("64:ff9b:1::/48", "NAT64"),
        ("100::/64", "discard"),
        ("2001::/23", "IETF protocol assignments"),
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "6to4"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)


def address_refusal(address: IPAddress) -> str | None:
    """Why ``address`` may not be called, or None when it is a public unicast address."""
    for network, why in _BLOCKED:
        if address.version == network.version and address in network:
            return why
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "not globally routable"
    return None


def _normalize_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


@dataclass(frozen=True)
class AllowList:
    """Hosts and networks exempt from the address policy (and allowed over plain http)."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """From entries such as ``localhost``, ``127.0.0.1``, ``10.1.0.0/16``, ``::1``.

        Raises ValueError for an entry that is neither a hostname nor an address or CIDR.
        """
        hosts: set[str] = set()
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = _normalize_host(entry)
            if not name or not all(c.isalnum() or c in "-._" for c in name) or not name.isascii():
                raise ValueError(f"allow-list entry {raw!r} is not a hostname, address or CIDR")
            hosts.add(name)
        return cls(hosts=frozenset(hosts), networks=tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)

    def permits_host(self, host: str) -> bool:
        """Whether ``host`` (a name) is listed."""
        return _normalize_host(host) in self.hosts

    def permits_address(self, address: IPAddress) -> bool:
        """Whether ``address`` is inside a listed network."""
        return any(address.version == net.version and address in net for net in self.networks)


@dataclass(frozen=True)
class Target:
    """A syntactically acceptable URL, split."""

    url: str
    scheme: str
    host: str
    """Lower-case host without brackets or trailing dot."""
    port: int
    literal: IPAddress | None = None
    """The address when the host is an IP literal."""


@dataclass(frozen=True)
class ResolvedTarget:
    """A URL whose every address passed the policy; connect only to ``addresses``."""

    target: Target
    addresses: tuple[IPAddress, ...] = field(default_factory=tuple)


def _refuse(reason: RefusalReason, message: str) -> UrlRefused:
    return UrlRefused(reason, message)


def _is_ambiguous_ipv4(host: str) -> bool:
    """True for the numeric spellings the C resolver accepts but that are not dotted quads."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


def parse_url(url: str) -> Target:
    """Syntax checks (no DNS). Raises :class:`UrlRefused`."""
    if not url:
        raise _refuse(RefusalReason.SYNTAX, "url is required")
    if len(url) > MAX_URL_LENGTH:
        raise _refuse(RefusalReason.SYNTAX, f"url is longer than {MAX_URL_LENGTH} characters")
    if not url.isascii() or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise _refuse(
            RefusalReason.SYNTAX,
            "url must be ASCII without spaces or control characters (use punycode for names)",
        )
    if "\\" in url:
        raise _refuse(RefusalReason.SYNTAX, "url must not contain backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refuse(RefusalReason.SYNTAX, f"url does not parse: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise _refuse(RefusalReason.SCHEME, "url must use https")
    if not parts.netloc:
        raise _refuse(RefusalReason.SYNTAX, "url has no host")
    if "@" in parts.netloc:
        raise _refuse(RefusalReason.USERINFO, "url must not contain userinfo (user@host)")
    raw_host = parts.hostname or ""
    if "%" in parts.netloc:
        raise _refuse(RefusalReason.SYNTAX, "percent-encoded hosts and zone ids are not allowed")
    host = _normalize_host(raw_host)
    if not host:
        raise _refuse(RefusalReason.SYNTAX, "url has no host")
    literal: IPAddress | None = None
    if parts.netloc.startswith("["):
        try:
            literal = ipaddress.IPv6Address(host)
        except ValueError:
            raise _refuse(RefusalReason.SYNTAX, "bad IPv6 literal") from None
    else:
        if not all(c.isalnum() or c in "-." for c in host):
            raise _refuse(RefusalReason.SYNTAX, "host has characters not allowed in a hostname")
        if _is_ambiguous_ipv4(host):
            raise _refuse(
                RefusalReason.AMBIGUOUS_IP,
                f"host {host!r} is a non-canonical IP address spelling",
            )
        try:
            literal = ipaddress.IPv4Address(host)
        except ValueError:
            literal = None
    effective_port = port if port is not None else (443 if scheme == "https" else 80)
    if not 0 < effective_port < 65536:
        raise _refuse(RefusalReason.SYNTAX, "port out of range")
    return Target(url=url, scheme=scheme, host=host, port=effective_port, literal=literal)


def check_addresses(
    target: Target, addresses: Iterable[str | IPAddress], allow: AllowList
) -> ResolvedTarget:
    """Apply the address policy to the resolved ``addresses`` of ``target``."""
    host_listed = allow.permits_host(target.host)
    checked: list[IPAddress] = []
    for raw in addresses:
        address = raw if not isinstance(raw, str) else ipaddress.ip_address(raw.split("%", 1)[0])
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        listed = (
            host_listed
            or allow.permits_address(address)
            or (mapped is not None and allow.permits_address(mapped))
        )
        if not listed:
            why = address_refusal(address)
            if why is not None:
                subject = (
                    f"address {address} is"
                    if target.literal is not None
                    else f"{target.host} resolves to {address},"
                )
                raise _refuse(
                    RefusalReason.FORBIDDEN_ADDRESS, f"{subject} a forbidden address ({why})"
                )
            if target.scheme != "https":
                raise _refuse(
                    RefusalReason.SCHEME,
                    "url must use https (http only for allow-listed hosts)",
                )
        if address not in checked:
            checked.append(address)
    if not checked:
        raise _refuse(RefusalReason.UNRESOLVABLE, f"{target.host} has no address")
    return ResolvedTarget(target=target, addresses=tuple(checked))


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """Resolve with the system resolver (``getaddrinfo``), TCP addresses only."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


async def check_url(
    url: str, allow: AllowList, resolver: Resolver = system_resolver
) -> ResolvedTarget:
    """Parse, resolve and check ``url``; the returned addresses are the only ones to connect to.

    Raises :class:`UrlRefused`; ``RESOLVER_UNAVAILABLE`` means DNS failed temporarily (retry later).
    """
    target = parse_url(url)
    if target.scheme != "https" and not allow:
        raise _refuse(RefusalReason.SCHEME, "url must use https")
    if target.literal is not None:
        return check_addresses(target, [target.literal], allow)
    try:
        addresses = await resolver(target.host, target.port)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise _refuse(
                RefusalReason.RESOLVER_UNAVAILABLE, f"{target.host}: DNS temporarily failed"
            ) from None
        raise _refuse(RefusalReason.UNRESOLVABLE, f"{target.host} does not resolve") from None
    except OSError as exc:
        raise _refuse(
            RefusalReason.RESOLVER_UNAVAILABLE, f"{target.host}: DNS failed: {exc}"
        ) from None
    return check_addresses(target, addresses, allow)


@dataclass(frozen=True)
class UrlPolicy:
    """The one URL policy of Conveyor: the gateway applies it at submit, the scheduler to webhook
    endpoints and per-task webhooks, the notifier (through :func:`check_addresses`) at delivery.

    https only (http only to allow-listed hosts), no userinfo or ambiguous IP spellings, and every
    address the host resolves to must be public unless the host or address is allow-listed. DNS is
    bounded by ``dns_timeout``; a temporary DNS failure or a timeout is
    :attr:`RefusalReason.RESOLVER_UNAVAILABLE` (the caller answers UNAVAILABLE: retry later), any
    other refusal is definitive (INVALID_ARGUMENT).
    """

    allow: AllowList = field(default_factory=AllowList)
    dns_timeout: float = 2.0
    resolver: Resolver = system_resolver

    @classmethod
    def from_entries(
        cls,
        entries: Sequence[str],
        *,
        dns_timeout: float = 2.0,
        resolver: Resolver = system_resolver,
    ) -> UrlPolicy:
        """Build from allow-list entries: host names, addresses or CIDRs."""
        return cls(AllowList.parse(list(entries)), dns_timeout, resolver)

    def syntax(self, url: str) -> Target:
        """Syntax checks without DNS; raises :class:`UrlRefused`."""
        target = parse_url(url)
        if target.scheme != "https" and not self.allow:
            raise _refuse(RefusalReason.SCHEME, "url must use https")
        return target

    async def check(self, url: str) -> ResolvedTarget:
        """Parse, resolve (within ``dns_timeout``) and check ``url``; raises :class:`UrlRefused`."""
        try:
            async with asyncio.timeout(self.dns_timeout):
                return await check_url(url, self.allow, self.resolver)
        except TimeoutError:
            host = parse_url(url).host
            raise _refuse(
                RefusalReason.RESOLVER_UNAVAILABLE, f"{host}: DNS resolution timed out"
            ) from None
