"""Address checks: pure function calls on IP strings, plus hostname resolution through
"localhost" and a patched resolver. Nothing here opens a connection."""

from __future__ import annotations

import socket

import pytest

from server.fetch import netguard
from server.fetch.netguard import MediaError, MediaPolicy, check_address, resolve_and_check


def policy(**overrides) -> MediaPolicy:
    values = dict(max_bytes=1 << 20, connect_timeout=1.0, read_timeout=1.0, total_timeout=5.0)
    values.update(overrides)
    return MediaPolicy(**values)


STRICT = policy()
LOOPBACK_ONLY = policy(allowed_networks=("127.0.0.1",))


@pytest.mark.parametrize(
    "ip, label",
    [
        ("10.0.0.1", "a private address"),
        ("172.16.5.4", "a private address"),
        ("172.31.255.255", "a private address"),
        ("192.168.1.1", "a private address"),
        ("100.64.0.1", "a shared (carrier-grade NAT) address"),
        ("127.0.0.1", "a loopback address"),
        ("127.255.255.254", "a loopback address"),
        ("169.254.169.254", "a link-local address"),
        ("0.0.0.0", "an unspecified ('this network') address"),
        ("0.1.2.3", "an unspecified ('this network') address"),
        ("224.0.0.1", "a multicast address"),
        ("239.255.255.250", "a multicast address"),
        ("255.255.255.255", "a broadcast address"),
        ("240.0.0.1", "a reserved address"),
        ("192.0.2.1", "a reserved (documentation) address"),
        ("198.18.0.1", "a reserved (benchmarking) address"),
        ("::1", "a loopback address"),
        ("::", "an unspecified address"),
        ("fe80::1", "a link-local address"),
        ("fc00::1", "a unique-local address"),
        ("fd12:3456::1", "a unique-local address"),
        ("fec0::1", "a site-local address"),
        ("ff02::1", "a multicast address"),
        ("2001:db8::1", "a reserved (documentation) address"),
        ("100::1", "a reserved (discard-only) address"),
        ("4000::1", "a reserved (unallocated) address"),
        ("::ffff:10.0.0.1", "a private address (IPv4-mapped 10.0.0.1)"),
        ("::ffff:127.0.0.1", "a loopback address (IPv4-mapped 127.0.0.1)"),
        ("::ffff:169.254.169.254", "a link-local address (IPv4-mapped 169.254.169.254)"),
        ("::10.0.0.1", "a private address (IPv4-compatible 10.0.0.1)"),
        ("64:ff9b::a9fe:a9fe", "a link-local address (NAT64 169.254.169.254)"),
        ("2002:a00:1::1", "a private address (6to4 10.0.0.1)"),
        ("2002:7f00:1::1", "a loopback address (6to4 127.0.0.1)"),
        # Teredo: client 192.0.2.45 is stored inverted in the last 32 bits.
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "a reserved (documentation) address (Teredo 192.0.2.45)"),
    ],
)
def test_refuses_non_public_addresses(ip: str, label: str) -> None:
    with pytest.raises(MediaError) as info:
        check_address(ip, STRICT, what="video_url")
    err = info.value
    assert (err.status_code, err.code) == (403, "forbidden_address")
    assert str(err) == f"video_url resolves to {ip}, {label}; refusing to fetch"


@pytest.mark.parametrize(
    "ip", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2001:4860::8888", "2606:4700::1111", "::ffff:8.8.8.8",
           "2002:808:808::1", "64:ff9b::808:808"],
)
def test_public_addresses_pass(ip: str) -> None:
    check_address(ip, STRICT)


def test_not_an_ip_is_a_bad_request() -> None:
    with pytest.raises(MediaError) as info:
        check_address("example.com", STRICT)
    assert (info.value.status_code, info.value.code) == (400, "invalid_url")


def test_allow_list_takes_single_ips_and_cidrs() -> None:
    check_address("127.0.0.1", LOOPBACK_ONLY)
    check_address("::ffff:127.0.0.1", LOOPBACK_ONLY)  # mapped form of an allowed IPv4
    with pytest.raises(MediaError) as info:
        check_address("127.0.0.2", LOOPBACK_ONLY)
    assert info.value.code == "forbidden_address"

    lan = policy(allowed_networks=("10.1.0.0/16", "fd00::/8"))
    check_address("10.1.2.3", lan)
    check_address("fd00::5", lan)
    for ip in ("10.2.0.1", "192.168.1.1", "fc00::1"):
        with pytest.raises(MediaError):
            check_address(ip, lan)


def test_allow_private_disables_the_guard() -> None:
    trusted = policy(allow_private=True)
    for ip in ("10.0.0.1", "127.0.0.1", "169.254.169.254", "::1", "fc00::1"):
        check_address(ip, trusted)


@pytest.mark.parametrize(
    "overrides",
    [
        {"allowed_networks": ("10.0.0.0/33",)},
        {"allowed_networks": ("not a host!",)},
        {"allowed_networks": ("0x7f.1",)},
        {"allowed_networks": "127.0.0.1"},
        {"max_bytes": 0},
        {"read_timeout": 0},
        {"max_redirects": -1},
    ],
)
def test_policy_rejects_bad_configuration(overrides: dict) -> None:
    with pytest.raises(ValueError):
        policy(**overrides)


def test_policy_is_frozen_and_hashable() -> None:
    assert policy() == policy()
    assert hash(LOOPBACK_ONLY) == hash(policy(allowed_networks=("127.0.0.1",)))
    with pytest.raises(AttributeError):
        LOOPBACK_ONLY.allow_private = True  # type: ignore[misc]


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f.1", "127.1", "017700000001", "foo.123", "ex%61mple.com", "a b", ""],
)
def test_ambiguous_or_malformed_hosts_are_invalid(host: str) -> None:
    with pytest.raises(MediaError) as info:
        netguard.validate_hostname(host, "video_url")
    assert (info.value.status_code, info.value.code) == (400, "invalid_url")


@pytest.mark.parametrize(
    "host", ["example.com", "media.example.com.", "xn--bcher-kva.de", "s3_bucket.local", "::1", "8.8.8.8"]
)
def test_plain_hosts_are_valid(host: str) -> None:
    netguard.validate_hostname(host, "video_url")


async def test_localhost_resolves_to_loopback_and_is_refused() -> None:
    with pytest.raises(MediaError) as info:
        await resolve_and_check("localhost", 80, STRICT, what="video_url")
    assert (info.value.status_code, info.value.code) == (403, "forbidden_address")
    assert "video_url host 'localhost' resolves to" in str(info.value)
    assert "loopback" in str(info.value)


async def test_allow_listed_hostname_is_trusted() -> None:
    addresses = await resolve_and_check("localhost", 80, policy(allowed_networks=("localhost",)), what="url")
    assert addresses and all(a in ("127.0.0.1", "::1") for a in addresses)


async def test_every_resolved_address_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("media.example.com", 443)
        return ["8.8.8.8", "10.0.0.5"]

    monkeypatch.setattr(netguard, "resolve_host", fake_resolve)
    with pytest.raises(MediaError) as info:
        await resolve_and_check("media.example.com", 443, STRICT, what="video_url")
    assert (info.value.status_code, info.value.code) == (403, "forbidden_address")
    assert str(info.value) == (
        "video_url host 'media.example.com' resolves to 10.0.0.5, a private address; refusing to fetch"
    )


async def test_public_answers_are_returned_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_resolve(host: str, port: int) -> list[str]:
        return ["2001:4860::8888", "8.8.8.8"]

    monkeypatch.setattr(netguard, "resolve_host", fake_resolve)
    assert await resolve_and_check("dns.example", 80, STRICT, what="url") == ["2001:4860::8888", "8.8.8.8"]


async def test_ip_literals_skip_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError("an IP literal must not be resolved")

    monkeypatch.setattr(netguard, "resolve_host", no_dns)
    assert await resolve_and_check("127.0.0.1", 80, LOOPBACK_ONLY, what="url") == ["127.0.0.1"]
    with pytest.raises(MediaError) as info:
        await resolve_and_check("::ffff:a9fe:a9fe", 80, LOOPBACK_ONLY, what="image_url")
    assert "169.254.169.254" in str(info.value)


async def test_unresolvable_host_is_a_fetch_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    async def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(netguard, "resolve_host", nxdomain)
    with pytest.raises(MediaError) as info:
        await resolve_and_check("does-not-exist.example", 80, STRICT, what="video_url")
    assert (info.value.status_code, info.value.code) == (400, "fetch_failed")
    assert "could not resolve host 'does-not-exist.example'" in str(info.value)
