"""Tests for the destination allow-list (triofwd._destinations): entry syntax, and the
matching rules as tables — names, patterns, ports, the default deny, DNS rebinding, IPv6."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triofwd._destinations import (
    DEFAULT_DENY,
    Destination,
    address_class,
    compile_destinations,
    normalize_host,
    parse_authority,
    parse_destination,
    parse_port_spec,
)

# --- Ports -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "ranges"),
    [
        ("443", ((443, 443),)),
        ("8000-8100", ((8000, 8100),)),
        ("*", ((1, 65535),)),
        ("80,443", ((80, 80), (443, 443))),
        ("443, 80", ((80, 80), (443, 443))),
        ("80,81,82", ((80, 82),)),  # adjacent ports merge
        ("8000-8100,8050-9000,1", ((1, 1), (8000, 9000))),
        ("1-65535", ((1, 65535),)),
        ("*,443", ((1, 65535),)),
        ("5-5", ((5, 5),)),
    ],
)
def test_port_specs(spec: str, ranges: tuple[tuple[int, int], ...]) -> None:
    assert parse_port_spec(spec) == ranges


@pytest.mark.parametrize("spec", ["", "0", "65536", "70000", "-1", "1-", "-5", "5-1", "a", "44 3", "1,,2", "1-2-3", "²", "0x50", "+80", "1e3", "000000443"])
def test_bad_port_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="ports"):
        parse_port_spec(spec)


# --- Entries -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "network", "name", "ports"),
    [
        ("10.0.0.0/8:443", "network", "10.0.0.0/8", None, ((443, 443),)),
        ("192.0.2.7:22", "network", "192.0.2.7/32", None, ((22, 22),)),
        ("10.1.2.3/8:1", "network", "10.0.0.0/8", None, ((1, 1),)),  # host bits dropped, as client_ips does
        ("[2001:db8::/32]:443", "network", "2001:db8::/32", None, ((443, 443),)),
        ("[::1]:22", "network", "::1/128", None, ((22, 22),)),
        ("[::ffff:10.0.0.0/104]:80", "network", "10.0.0.0/8", None, ((80, 80),)),  # mapped: kept as IPv4
        ("db.internal:5432", "name", None, "db.internal", ((5432, 5432),)),
        ("DB.Internal.:5432", "name", None, "db.internal", ((5432, 5432),)),
        ("_srv.example.com:1", "name", None, "_srv.example.com", ((1, 1),)),
        ("xn--bcher-kva.example:443", "name", None, "xn--bcher-kva.example", ((443, 443),)),
        ("localhost:80", "name", None, "localhost", ((80, 80),)),
        ("*.example.com:443", "suffix", None, "example.com", ((443, 443),)),
        ("*.Example.COM:8000-8100", "suffix", None, "example.com", ((8000, 8100),)),
        ("*:443", "any", None, None, ((443, 443),)),
        ("*:*", "any", None, None, ((1, 65535),)),
        ("  db.internal:5432  ", "name", None, "db.internal", ((5432, 5432),)),
    ],
)
def test_entries(text: str, kind: str, network: str | None, name: str | None, ports: tuple[tuple[int, int], ...]) -> None:
    entry = parse_destination(text)
    assert (entry.kind, entry.name, entry.ports, entry.text) == (kind, name, ports, text)
    assert entry.network == (ipaddress.ip_network(network) if network else None)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("10.0.0.0/8", "ports are required"),
        ("db.internal", "ports are required"),
        (":443", "expected HOST:PORTS"),
        ("", "expected HOST:PORTS"),
        ("2001:db8::/32:443", "brackets"),
        ("::1:22", "brackets"),
        ("[10.0.0.0/8]:443", "brackets are for IPv6"),
        ("[db.internal]:443", "brackets are for IPv6"),
        ("[2001:db8::/32]", "expected \\[IPv6"),
        ("[2001:db8::/32]443", "expected \\[IPv6"),
        ("[2001:db8::/129]:443", "not an address or CIDR"),
        ("10.0.0.256:443", "not an address or CIDR"),
        ("10.0.0.0/33:443", "not an address or CIDR"),
        ("1.2.3:443", "not an address or CIDR"),
        ("a.*.com:443", "wildcard"),
        ("*example.com:443", "wildcard"),
        ("**.example.com:443", "wildcard"),
        ("*.*.example.com:443", "not a host name"),
        ("*.:443", "not a host name"),
        ("bad_name!:443", "not a host name"),
        ("a..b:443", "not a host name"),
        ("-a.example:443", "not a host name"),
        ("a" * 64 + ".example:443", "not a host name"),
        ("bücher.example:443", "xn--"),
        ("db.internal:0", "ports"),
        ("db.internal:x", "ports"),
        ("db.internal:", "ports"),
        ("db.internal:443-80", "backwards"),
    ],
)
def test_bad_entries(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_destination(text)
    assert repr(text) in str(info.value)  # the message names the entry


def test_compile_names_the_first_bad_entry() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        compile_destinations(["*:443", "nope", "also bad"])


def test_entry_port_matching() -> None:
    entry = parse_destination("x.example:80,8000-8100")
    assert [p for p in (79, 80, 81, 7999, 8000, 8050, 8100, 8101) if entry.allows_port(p)] == [80, 8000, 8050, 8100]


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("*.example.com:1", "a.example.com", True),
        ("*.example.com:1", "a.b.example.com", True),  # any depth (unlike SNI `domains`)
        ("*.example.com:1", "example.com", False),
        ("*.example.com:1", "badexample.com", False),
        ("*.example.com:1", "example.com.evil.net", False),
        ("example.com:1", "example.com", True),
        ("example.com:1", "a.example.com", False),
        ("*:1", "anything.at.all", True),
        ("10.0.0.0/8:1", "a.example.com", False),
    ],
)
def test_name_matching(pattern: str, name: str, matches: bool) -> None:
    assert parse_destination(pattern).matches_name(name) is matches


# --- Hosts and authorities (shared with the codecs) -----------------------------------


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("127.0.0.1", "127.0.0.1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("::ffff:10.0.0.1", "::ffff:a00:1"),
        ("0x7f.1", "0x7f.1"),  # not an address to ipaddress: a name, and judged by what it resolves to
    ],
)
def test_normalize_host(text: str, host: str) -> None:
    assert normalize_host(text) == host


@pytest.mark.parametrize("text", ["", ".", "a b", "a/b", "a\x00", "bücher.de", "[example.com]", "[::1", "fe80::1%eth0x", "a" * 254])
def test_normalize_host_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        normalize_host(text)


@pytest.mark.parametrize(
    ("text", "result"),
    [
        ("example.com:443", ("example.com", 443)),
        ("EXAMPLE.com.:80", ("example.com", 80)),
        ("192.0.2.7:443", ("192.0.2.7", 443)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("[::1]:0", ("::1", 0)),
        ("x:65535", ("x", 65535)),
    ],
)
def test_parse_authority(text: str, result: tuple[str, int]) -> None:
    assert parse_authority(text) == result


@pytest.mark.parametrize("text", ["example.com", "example.com:", ":443", "/", "example.com:65536", "example.com:-1", "2001:db8::1:443", "[2001:db8::1]", "[x]:443", "a b:1", "x:٤٤٣"])
def test_parse_authority_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(text)


# --- Address classes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "cls"),
    [
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("172.32.0.1", None),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("100.127.255.255", "private"),
        ("100.128.0.1", None),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("240.0.0.1", "reserved"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fec0::1", "private"),
        ("ff02::1", "multicast"),
        ("::127.0.0.1", "reserved"),  # IPv4-compatible (deprecated)
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", None),
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:0a00:0001::1", "private"),
        ("2002:0808:0808::1", None),
    ],
)
def test_address_classes(address: str, cls: str | None) -> None:
    assert address_class(address) == cls
    assert address_class(ipaddress.ip_address(address.partition("%")[0])) == cls


def test_default_deny_covers_what_ipaddress_calls_private_loopback_link_local() -> None:
    """Cross-check the table against the standard library on a spread of addresses."""
    for text in ["10.9.8.7", "127.3.2.1", "169.254.0.9", "192.168.255.1", "::1", "fe80::9", "fd00::9", "0.0.0.0", "::"]:
        ip = ipaddress.ip_address(text)
        assert ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_unspecified
        assert address_class(text) is not None


def test_default_deny_ranges_are_each_checked() -> None:
    for _, network in DEFAULT_DENY:
        assert address_class(network.network_address) is not None


# --- The matcher: names before resolution ------------------------------------------

LIST = [
    "*.example.com:443",
    "db.internal:5432",
    "10.0.0.0/8:22",
    "[2001:db8::/32]:80,443",
    "[fd00:1::/48]:8443",
    "192.0.2.0/24:8000-8100",
    "public.example.net:*",
]


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("a.example.com", 443, True),
        ("A.Example.Com.", 443, True),
        ("a.b.example.com", 443, True),
        ("example.com", 443, False),
        ("a.example.com", 80, False),
        ("db.internal", 5432, True),
        ("db.internal", 5433, False),
        ("other.internal", 5432, False),
        ("public.example.net", 1, True),
        ("public.example.net", 65535, True),
        # literals are judged as addresses
        ("10.1.2.3", 22, True),
        ("10.1.2.3", 23, False),
        ("192.0.2.9", 8050, True),
        ("192.0.2.9", 8101, False),
        ("2001:db8::1", 443, True),
        ("2001:db8::1", 22, False),
        ("2001:db9::1", 443, False),
        ("fd00:1::5", 8443, True),
        ("fd00:2::5", 8443, False),
        ("8.8.8.8", 443, False),  # no "*" entry: a public literal needs a CIDR
        ("127.0.0.1", 443, False),
        # never a name
        ("", 443, False),
        ("a b.example.com", 443, False),
        ("bücher.example.com", 443, False),
    ],
)
def test_allows_name(host: str, port: int, allowed: bool) -> None:
    assert compile_destinations(LIST).allows_name(host, port) is allowed


def test_cidr_entries_do_not_allow_names() -> None:
    dests = compile_destinations(["10.0.0.0/8:22", "0.0.0.0/0:443"])
    assert not dests.allows_name("db.internal", 22)
    assert not dests.allows_name("example.com", 443)
    assert dests.allows_name("8.8.8.8", 443)


def test_empty_list_allows_nothing() -> None:
    dests = compile_destinations([])
    assert not dests.allows_name("example.com", 443)
    assert not dests.allows_name("8.8.8.8", 443)
    assert not dests.allows_address("8.8.8.8", 443, via_name="example.com")


# --- The matcher: resolved addresses, the default deny and rebinding -----------------

REBINDING = ["*:443", "*.example.com:8443", "db.internal:5432", "metadata.internal:80", "10.20.0.0/16:443"]


@pytest.mark.parametrize(
    ("name", "address", "port", "allowed"),
    [
        # a public name resolving to public addresses
        ("example.org", "93.184.216.34", 443, True),
        ("example.org", "2606:2800:220:1::1", 443, True),
        ("example.org", "93.184.216.34", 80, False),
        # rebinding: an allowed name that resolves to a denied address
        ("evil.example.org", "127.0.0.1", 443, False),
        ("evil.example.org", "10.0.0.1", 443, False),
        ("evil.example.org", "169.254.169.254", 443, False),
        ("evil.example.org", "0.0.0.0", 443, False),
        ("evil.example.org", "100.64.1.1", 443, False),
        ("evil.example.org", "224.0.0.1", 443, False),
        ("evil.example.org", "::1", 443, False),
        ("evil.example.org", "::", 443, False),
        ("evil.example.org", "fe80::1%eth0", 443, False),
        ("evil.example.org", "fd00::1", 443, False),
        ("evil.example.org", "::ffff:127.0.0.1", 443, False),
        ("evil.example.org", "::ffff:10.0.0.1", 443, False),
        ("evil.example.org", "64:ff9b::7f00:1", 443, False),
        ("evil.example.org", "2002:7f00:1::", 443, False),
        ("a.example.com", "192.168.0.1", 8443, False),
        # names that are addresses in disguise are resolved, and what they resolve to is judged
        ("2130706433", "127.0.0.1", 443, False),
        ("0x7f.1", "127.0.0.1", 443, False),
        ("localhost", "127.0.0.1", 443, False),
        # an explicit CIDR lifts the deny for what it lists, whatever name led there
        ("evil.example.org", "10.20.3.4", 443, True),
        ("evil.example.org", "::ffff:10.20.3.4", 443, True),
        ("evil.example.org", "10.21.3.4", 443, False),
        ("evil.example.org", "10.20.3.4", 444, False),
        # an exact name vouches for the private addresses it resolves to (rule 4) ...
        ("db.internal", "10.0.0.7", 5432, True),
        ("db.internal", "172.16.5.5", 5432, True),
        ("db.internal", "fd12::7", 5432, True),
        ("db.internal", "100.100.1.1", 5432, True),
        ("DB.internal.", "10.0.0.7", 5432, True),
        ("db.internal", "10.0.0.7", 5433, False),
        ("db.internal", "8.8.8.8", 5432, True),
        # ... but not for loopback, link-local, unspecified or multicast ones
        ("db.internal", "127.0.0.1", 5432, False),
        ("db.internal", "::1", 5432, False),
        ("db.internal", "0.0.0.0", 5432, False),
        ("metadata.internal", "169.254.169.254", 80, False),
        ("db.internal", "::ffff:127.0.0.1", 5432, False),
        # a pattern or "*" vouches for nothing: same private address, denied
        ("x.example.com", "10.0.0.7", 8443, False),
        ("db.internal", "10.0.0.7", 443, False),
        # a name the list does not allow is denied even at a public address
        ("not-listed.example.net", "93.184.216.34", 80, False),
    ],
)
def test_resolved_addresses(name: str, address: str, port: int, allowed: bool) -> None:
    dests = compile_destinations(REBINDING)
    assert dests.allows_address(address, port, via_name=name) is allowed
    reason = dests.why_denied(address, port, via_name=name)
    assert (reason is None) is allowed
    if reason is not None:
        assert str(port) in reason


@pytest.mark.parametrize(
    ("entries", "address", "allowed"),
    [
        # "explicitly": the entry's network lies within the denied range
        (["10.0.0.0/8:1"], "10.1.1.1", True),
        (["10.1.1.1/32:1"], "10.1.1.1", True),
        (["10.0.0.0/7:1"], "10.1.1.1", False),
        (["0.0.0.0/0:1"], "10.1.1.1", False),
        (["0.0.0.0/0:1"], "127.0.0.1", False),
        (["0.0.0.0/0:1"], "8.8.8.8", True),
        (["127.0.0.0/8:1"], "127.0.0.1", True),
        (["127.0.0.1/32:1"], "127.0.0.1", True),
        (["127.0.0.1/32:1"], "127.0.0.2", False),
        (["169.254.169.254/32:1"], "169.254.169.254", True),
        (["172.0.0.0/8:1"], "172.16.0.1", False),
        (["172.16.0.0/12:1"], "172.16.0.1", True),
        (["100.64.0.0/10:1"], "100.64.0.1", True),
        (["[::/0]:1"], "::1", False),
        (["[::/0]:1"], "2001:db8::1", True),
        (["[::1]:1"], "::1", True),
        (["[fc00::/7]:1"], "fd00::1", True),
        (["[fd00::/8]:1"], "fd00::1", True),
        (["[fe80::/10]:1"], "fe80::1%eth0", True),
        (["[fe80::/10]:1"], "fe80::1", True),
        # IPv4 forms in IPv6: judged, and listed, as the IPv4 address
        (["127.0.0.1/32:1"], "::ffff:127.0.0.1", True),
        (["10.0.0.0/8:1"], "64:ff9b::a00:1", True),
        (["[64:ff9b::/96]:1"], "64:ff9b::a00:1", False),
        (["[64:ff9b::/96]:1"], "64:ff9b::808:808", True),
        (["[::ffff:127.0.0.0/104]:1"], "127.0.0.1", True),
        (["*:1"], "8.8.8.8", True),
        (["*:1"], "10.0.0.1", False),
        (["*:1"], "::ffff:10.0.0.1", False),
        (["*.example.com:1"], "8.8.8.8", False),
        (["8.8.8.8:2"], "8.8.8.8", False),
    ],
)
def test_literal_addresses(entries: list[str], address: str, allowed: bool) -> None:
    dests = compile_destinations(entries)
    assert dests.allows_address(address, 1, via_name=None) is allowed
    assert dests.allows_name(normalize_host(address.partition("%")[0]), 1) is allowed
    assert dests.allows_address(ipaddress.ip_address(address.partition("%")[0]), 1, via_name=None) is allowed


# --- Own listening addresses -------------------------------------------------------

OWN = [("203.0.113.5", 1080), ("0.0.0.0", 3128), ("::", 8080), ("2001:db8::5", 1080)]


@pytest.mark.parametrize(
    ("entries", "address", "port", "allowed"),
    [
        (["*:*"], "203.0.113.5", 1080, False),
        (["*:*"], "203.0.113.5", 1081, True),
        (["*:*"], "::ffff:203.0.113.5", 1080, False),
        (["0.0.0.0/0:*"], "203.0.113.5", 1080, False),
        (["203.0.113.0/24:*"], "203.0.113.5", 1080, False),
        (["203.0.113.5/32:1080"], "203.0.113.5", 1080, True),  # the exact address: meant
        (["*:*"], "2001:db8::5", 1080, False),
        (["[2001:db8::5]:1080"], "2001:db8::5", 1080, True),
        # a wildcard listener is reached through loopback and the unspecified address
        (["127.0.0.0/8:*"], "127.0.0.1", 3128, False),
        (["127.0.0.0/8:*"], "127.0.0.1", 3129, True),
        (["127.0.0.1/32:3128"], "127.0.0.1", 3128, True),
        (["127.0.0.0/8:*"], "127.0.0.1", 8080, False),  # "::" listeners are dual-stack
        (["[::1]:*"], "::1", 8080, True),  # ::1 has one address: the entry is exact, and meant
        (["[::1]:*"], "::1", 3128, True),  # 0.0.0.0 is IPv4 only
        (["*:*"], "198.51.100.1", 3128, True),  # another host on the same port is fine
    ],
)
def test_own_addresses(entries: list[str], address: str, port: int, allowed: bool) -> None:
    dests = compile_destinations(entries, own_addresses=OWN)
    assert dests.allows_address(address, port, via_name=None) is allowed
    if not allowed:
        reason = dests.why_denied(address, port, via_name=None)
        assert reason is not None and ("own" in reason or "loopback" in reason)


def test_own_address_via_a_name() -> None:
    dests = compile_destinations(["self.example:1080", "*:1080"], own_addresses=OWN)
    assert dests.allows_name("self.example", 1080)
    assert not dests.allows_address("203.0.113.5", 1080, via_name="self.example")


# --- Properties --------------------------------------------------------------------

ipv4s = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6s = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
addresses = st.one_of(ipv4s, ipv6s, ipv4s.map(lambda ip: ipaddress.IPv6Address(int(ip) | 0xFFFF00000000)))
ports = st.integers(1, 65535)


@settings(max_examples=300, deadline=None)
@given(addresses, ports, st.sampled_from([None, "example.org", "db.internal", "a.example.com"]))
def test_default_denied_addresses_pass_only_by_rule(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, via: str | None) -> None:
    """With no CIDR entries, a default-denied address passes only as a private address of
    an exact name; every other address passes only through a name or "*" entry."""
    dests = compile_destinations(["*:*", "*.example.com:*", "db.internal:*"])
    allowed = dests.allows_address(ip, port, via_name=via)
    cls = address_class(ip)
    if cls is None:
        assert allowed
    else:
        assert allowed == (cls == "private" and via == "db.internal")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.integers(-5, 70000))
def test_entries_parse_or_raise_value_error(text: str, port: int) -> None:
    for candidate in (text, f"{text}:{port}", f"[{text}]:{port}", f"*.{text}:{port}"):
        try:
            entry = parse_destination(candidate)
        except ValueError:
            continue
        assert isinstance(entry, Destination) and entry.ports


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_hosts_normalize_or_raise_value_error(text: str) -> None:
    try:
        host = normalize_host(text)
    except ValueError:
        return
    assert normalize_host(host) == host  # canonical form is a fixed point
