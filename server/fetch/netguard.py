"""Address checks for outbound media fetches (SSRF guard).

Pure library code: no FastAPI. ``server.fetch.fetch`` builds on this module (URL parsing, address
checks, pinned resolution) and re-exports ``MediaError``, ``MediaPolicy`` and ``check_address``.

The rule is "public unicast only": every address a URL resolves to must be a globally
routable unicast address, unless the operator allow-lists it (``allowed_networks``) or turns
the guard off (``allow_private``). IPv6 addresses that embed an IPv4 address (mapped,
compatible, NAT64, 6to4, Teredo) are judged by the IPv4 address they lead to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Union

import httpx

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

MAX_URL_LENGTH = 8192


class MediaError(Exception):
    """A media input was refused. ``status_code`` is always 4xx; ``code`` is stable for clients."""

    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"MediaError({self.status_code}, {self.code!r}, {self.message!r})"


_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\.?\Z){_LABEL}(\.{_LABEL})*\.?\Z")


@dataclass(frozen=True)
class MediaPolicy:
    """Limits for one media input. Build once from settings and share; it is immutable.

    ``allowed_networks`` holds CIDRs ("10.1.0.0/16"), single IPs ("127.0.0.1") or exact
    hostnames ("minio.internal") that may be fetched even though they are private or
    loopback. An allow-listed hostname trusts whatever that name resolves to.
    """

    max_bytes: int
    connect_timeout: float
    read_timeout: float
    total_timeout: float
    max_redirects: int = 5
    allowed_networks: tuple[str, ...] = ()
    allow_private: bool = False
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)
    _hostnames: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        for name in ("connect_timeout", "read_timeout", "total_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")
        if isinstance(self.allowed_networks, str):
            raise ValueError("allowed_networks must be a tuple of strings, not one string")
        networks: list[IPNetwork] = []
        hostnames: set[str] = set()
        for entry in self.allowed_networks:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
                continue
            except ValueError:
                pass
            name = entry.strip().lower().rstrip(".")
            if not _HOSTNAME.match(name) or _looks_numeric(name):
                raise ValueError(f"allowed_networks entry {entry!r} is neither a CIDR, an IP nor a hostname")
            hostnames.add(name)
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        object.__setattr__(self, "_networks", tuple(networks))
        object.__setattr__(self, "_hostnames", frozenset(hostnames))

    def allows_host(self, host: str) -> bool:
        """True when ``host`` is an allow-listed hostname (exact match, case-insensitive)."""
        return self.allow_private or host.lower().rstrip(".") in self._hostnames

    def allows_ip(self, addr: IPAddress) -> bool:
        if self.allow_private:
            return True
        candidates = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            candidates.append(addr.ipv4_mapped)
        return any(c.version == net.version and c in net for c in candidates for net in self._networks)


# Blocked ranges; the first match names the reason. Public unicast is whatever is left over.
_V4_BLOCKED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "an unspecified ('this network')"),
    ("10.0.0.0/8", "a private"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT)"),
    ("127.0.0.0/8", "a loopback"),
    ("169.254.0.0/16", "a link-local"),
    ("172.16.0.0/12", "a private"),
    ("192.0.0.0/24", "a reserved (IETF protocol)"),
    ("192.0.2.0/24", "a reserved (documentation)"),
    ("192.88.99.0/24", "a reserved (6to4 relay)"),
    ("192.168.0.0/16", "a private"),
    ("198.18.0.0/15", "a reserved (benchmarking)"),
    ("198.51.100.0/24", "a reserved (documentation)"),
    ("203.0.113.0/24", "a reserved (documentation)"),
    ("224.0.0.0/4", "a multicast"),
    ("255.255.255.255/32", "a broadcast"),
    ("240.0.0.0/4", "a reserved"),
)
_V6_BLOCKED: tuple[tuple[str, str], ...] = (
    ("::/128", "an unspecified"),
    ("::1/128", "a loopback"),
    ("64:ff9b:1::/48", "a reserved (local NAT64)"),
    ("100::/64", "a reserved (discard-only)"),
    ("2001::/23", "a reserved (IETF protocol)"),
    ("2001:db8::/32", "a reserved (documentation)"),
    ("3fff::/20", "a reserved (documentation)"),
    ("5f00::/16", "a reserved (SRv6)"),
    ("fc00::/7", "a unique-local"),
    ("fe80::/10", "a link-local"),
    ("fec0::/10", "a site-local"),
    ("ff00::/8", "a multicast"),
)
_V4_TABLE = tuple((ipaddress.IPv4Network(n), label) for n, label in _V4_BLOCKED)
_V6_TABLE = tuple((ipaddress.IPv6Network(n), label) for n, label in _V6_BLOCKED)
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_V6_COMPAT = ipaddress.IPv6Network("::/96")
_V6_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V6_TEREDO = ipaddress.IPv6Network("2001::/32")


def _v4_reason(addr: ipaddress.IPv4Address) -> str | None:
    for net, label in _V4_TABLE:
        if addr in net:
            return label
    return None if addr.is_global else "a reserved (non-global)"


def _embedded_v4(addr: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address leads to, with the name of the embedding."""
    low32 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.ipv4_mapped is not None:
        return "IPv4-mapped", addr.ipv4_mapped
    if addr in _V6_COMPAT and int(addr) > 1:
        return "IPv4-compatible", low32
    if addr in _V6_NAT64:
        return "NAT64", low32
    if addr.sixtofour is not None:
        return "6to4", addr.sixtofour
    if addr in _V6_TEREDO and addr.teredo is not None:
        return "Teredo", addr.teredo[1]
    return None


def forbidden_reason(addr: IPAddress) -> str | None:
    """Why ``addr`` may not be fetched (e.g. "a private address"), or None for public unicast."""
    if isinstance(addr, ipaddress.IPv4Address):
        label = _v4_reason(addr)
        return None if label is None else f"{label} address"
    embedded = _embedded_v4(addr)
    if embedded is not None:
        how, v4 = embedded
        inner = _v4_reason(v4)
        return None if inner is None else f"{inner} address ({how} {v4})"
    for net, label in _V6_TABLE:
        if addr in net:
            return f"{label} address"
    return None if addr in _V6_GLOBAL_UNICAST else "a reserved (unallocated) address"


def check_address(ip: str, policy: MediaPolicy, *, what: str = "url") -> None:
    """Raise MediaError(403, "forbidden_address") unless ``ip`` is public or allow-listed.

    ``what`` names the input in the message, e.g. "video_url".
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise MediaError(400, "invalid_url", f"{what}: {ip!r} is not an IP address") from None
    if policy.allows_ip(addr):
        return
    reason = forbidden_reason(addr)
    if reason is not None:
        raise MediaError(
            403, "forbidden_address", f"{what} resolves to {ip}, {reason}; refusing to fetch"
        )


def _looks_numeric(host: str) -> bool:
    """True for hosts that some resolvers read as an IPv4 number (2130706433, 0x7f.1, 127.1)."""
    last = host.rstrip(".").rsplit(".", 1)[-1]
    return bool(re.fullmatch(r"[0-9]+|0x[0-9a-f]*", last))


def parse_ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def validate_hostname(host: str, what: str) -> None:
    """Reject hosts that are neither an IP literal nor a plain DNS name."""
    if not host:
        raise MediaError(400, "invalid_url", f"{what} has no host")
    if "%" in host:
        raise MediaError(400, "invalid_url", f"{what} host {host!r} has a percent sign or an IPv6 zone")
    if parse_ip_literal(host) is not None:
        return
    if _looks_numeric(host):
        raise MediaError(400, "invalid_url", f"{what} host {host!r} is a non-canonical IP address")
    if not _HOSTNAME.match(host):
        raise MediaError(400, "invalid_url", f"{what} host {host!r} is not a valid hostname")


def _bad_url(what: str, problem: str) -> MediaError:
    return MediaError(400, "invalid_url", f"{what} {problem}")


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def parse_http_url(url: str, what: str) -> httpx.URL:
    """Parse an http(s) URL strictly: no credentials, no odd hosts, no whitespace; drop the fragment."""
    if len(url) > MAX_URL_LENGTH:
        raise _bad_url(what, f"is longer than {MAX_URL_LENGTH} characters")
    if any(c <= " " or c == "\x7f" or c == "\\" for c in url):
        raise _bad_url(what, "contains whitespace, control characters or '\\'")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise _bad_url(what, f"is not a valid URL ({describe(exc)})") from None
    if parsed.scheme not in ("http", "https"):
        raise _bad_url(what, f"must use http or https, not {parsed.scheme or 'no scheme'!r}")
    if parsed.userinfo:
        raise _bad_url(what, "must not contain credentials ('user@' before the host)")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise _bad_url(what, f"has an invalid port {parsed.port}")
    validate_hostname(parsed.raw_host.decode("ascii"), what)
    return parsed.copy_with(fragment=None)


async def resolve_host(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to, in resolver order, without duplicates.

    Tests patch this function (``server.fetch.netguard.resolve_host``) to fake DNS answers.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def resolve_and_check(host: str, port: int, policy: MediaPolicy, *, what: str) -> list[str]:
    """Resolve ``host`` and check every address; return the addresses safe to connect to."""
    literal = parse_ip_literal(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = await resolve_host(host, port)
        except (socket.gaierror, UnicodeError) as exc:
            message = f"{what}: could not resolve host {host!r} ({exc})"
            raise MediaError(400, "fetch_failed", message) from None
        if not addresses:
            raise MediaError(400, "fetch_failed", f"{what}: host {host!r} has no addresses")
        if policy.allows_host(host):
            return addresses
    for address in addresses:
        check_address(address, policy, what=what if literal is not None else f"{what} host {host!r}")
    return addresses
