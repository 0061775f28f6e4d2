"""Tests for the pure PROXY protocol v1/v2 codec (triofwd._proxy_protocol)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triofwd._proxy_protocol import (
    MAX_V2_PAYLOAD_BYTES,
    V1_MAX_LINE,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    parse_proxy_header,
)

FAST = settings(max_examples=300, deadline=None)

# Written out by hand from the spec (§2.2) rather than imported, so that a
# wrong constant in the module cannot make the tests agree with it.
SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"


def outcome(data: bytes) -> tuple[ProxyHeader, int] | str | None:
    """The parser's answer, with its one allowed exception folded into a value."""
    try:
        return parse_proxy_header(data)
    except ProxyHeaderError:
        return "error"


# --- Version 1 examples ----------------------------------------------------------


def test_v1_spec_example() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == line
    result = parse_proxy_header(line + b"GET / HTTP/1.1\r\n")
    assert result == (
        ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
        len(line),
    )


def test_v1_ipv6() -> None:
    line = encode_v1(("2001:db8::1", 0), ("::1", 65535))
    assert line == b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n"
    header, consumed = parse_proxy_header(line) or (None, 0)
    assert header is not None and consumed == len(line)
    assert header.family == "TCP6"
    assert (header.source, header.destination) == (("2001:db8::1", 0), ("::1", 65535))


def test_v1_ipv6_is_canonicalised() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 0:0::1 1 2\r\n"
    header, _ = parse_proxy_header(line) or (None, 0)
    assert header is not None
    assert header.source == ("2001:db8::1", 1)
    assert header.destination == ("::1", 2)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f::f ffff:f::f 65535 65535\r\n",
        b"PROXY UNKNOWN whatever \xff the sender put here\r\n",
    ],
)
def test_v1_unknown(line: bytes) -> None:
    assert parse_proxy_header(line + b"data") == (
        ProxyHeader(1, "PROXY", "UNKNOWN", None, None),
        len(line),
    )


def test_v1_unknown_encoding() -> None:
    assert encode_v1(None, ("1.2.3.4", 80)) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("1.2.3.4", 80), None) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("1.2.3.4", 80), ("::1", 80)) == b"PROXY UNKNOWN\r\n"


def test_v1_socket_address_forms() -> None:
    # An AF_INET6 getpeername() 4-tuple with a scope: both are dropped.
    line = encode_v1(("fe80::1%eth0", 1234, 0, 2), ("fe80::2", 443, 0, 2))
    assert line == b"PROXY TCP6 fe80::1 fe80::2 1234 443\r\n"


def test_v1_longest_line_is_accepted() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX_LINE
    assert parse_proxy_header(line) == (ProxyHeader(1, "PROXY", "UNKNOWN", None, None), 107)
    line6 = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    result = parse_proxy_header(line6)
    assert result is not None and result[0].source == (full, 65535)


def test_v1_prefixes_need_more() -> None:
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    for end in range(len(line)):
        assert parse_proxy_header(line[:end]) is None, end


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"GET / HTTP/1.1\r\n", "not a PROXY"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY"),
        (b"PROXY\tTCP4", "not a PROXY"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "stray CR or LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", None),  # still a valid prefix
        (b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n", "stray CR or LF"),
        (b"PROXY TCP4 1.2.3.4\rX", "stray CR or LF"),
        (b"PROXY " + b"A" * 101, "no CRLF within 107"),
        (b"PROXY " + b"A" * 99 + b"\r\n", "6 fields"),
        (b"PROXY " + b"A" * 100 + b"\r\n", "no CRLF within 107"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "6 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "6 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "6 fields"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown v1 protocol"),
        (b"PROXY UNKNOWNX\r\n", "6 fields"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "IPv4"),
        (b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n", "IPv6"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "IPv4"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "IPv4"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "IPv4"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "IPv6"),
        (b"PROXY TCP6 ::1::2 ::1 1 2\r\n", "IPv6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2x\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xb2\r\n", "non-ASCII"),
    ],
)
def test_v1_invalid(data: bytes, match: str | None) -> None:
    if match is None:
        assert parse_proxy_header(data) is None
        return
    with pytest.raises(ProxyHeaderError, match=match):
        parse_proxy_header(data)


# --- Version 2 examples ----------------------------------------------------------


def test_v2_tcp4_exact_bytes() -> None:
    expected = (
        SIG
        + b"\x21\x11\x00\x0c"  # v2 PROXY, TCP over IPv4, 12 address bytes
        + bytes([10, 0, 0, 1, 192, 168, 1, 2])
        + (443).to_bytes(2, "big")
        + (8443).to_bytes(2, "big")
    )
    assert encode_v2(("10.0.0.1", 443), ("192.168.1.2", 8443)) == expected
    assert parse_proxy_header(expected + b"\x16\x03\x01") == (
        ProxyHeader(2, "PROXY", "TCP4", ("10.0.0.1", 443), ("192.168.1.2", 8443)),
        28,
    )


def test_v2_tcp6_with_tlvs_exact_bytes() -> None:
    src, dst = ipaddress.IPv6Address("2001:db8::5"), ipaddress.IPv6Address("::1")
    tlvs = ((0x01, b"h2"), (0x02, b"example.com"), (0x04, b""))
    tlv_bytes = b"\x01\x00\x02h2" + b"\x02\x00\x0bexample.com" + b"\x04\x00\x00"
    expected = (
        SIG
        + b"\x21\x21"
        + (36 + len(tlv_bytes)).to_bytes(2, "big")
        + src.packed
        + dst.packed
        + b"\x30\x39\x01\xbb"  # ports 12345 and 443
        + tlv_bytes
    )
    assert encode_v2(("2001:db8::5", 12345), ("::1", 443), tlvs=tlvs) == expected
    assert parse_proxy_header(expected) == (
        ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::5", 12345), ("::1", 443), tlvs),
        len(expected),
    )


def test_v2_local() -> None:
    data = encode_v2(None, None, command="LOCAL")
    assert data == SIG + b"\x20\x00\x00\x00"
    assert parse_proxy_header(data) == (ProxyHeader(2, "LOCAL", "UNKNOWN", None, None), 16)
    # The addresses are ignored for LOCAL, as the spec tells receivers to.
    assert encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), command="LOCAL") == data


def test_v2_local_with_addresses_from_another_sender() -> None:
    # "must not assume zero is presented for LOCAL connections" (§2.2)
    data = SIG + b"\x20\x11\x00\x0f" + bytes(12) + b"\x05\x00\x00"
    header, consumed = parse_proxy_header(data + b"rest") or (None, 0)
    assert consumed == len(data)
    assert header == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, ((5, b""),))


def test_v2_unspec_and_mixed_families() -> None:
    expected = SIG + b"\x21\x00\x00\x00"
    assert encode_v2(None, ("1.2.3.4", 80)) == expected
    assert encode_v2(("::1", 80), ("1.2.3.4", 80)) == expected
    assert parse_proxy_header(expected) == (ProxyHeader(2, "PROXY", "UNKNOWN", None, None), 16)


@pytest.mark.parametrize(("fam", "size"), [(0x12, 12), (0x22, 36), (0x31, 216), (0x32, 216)])
def test_v2_udp_and_unix_fall_back_to_unspec(fam: int, size: int) -> None:
    tlv = b"\xe0\x00\x01z"
    data = SIG + bytes([0x21, fam]) + (size + len(tlv)).to_bytes(2, "big") + bytes(size) + tlv
    assert parse_proxy_header(data) == (
        ProxyHeader(2, "PROXY", "UNKNOWN", None, None, ((0xE0, b"z"),)),
        len(data),
    )


def test_v2_prefixes_need_more() -> None:
    data = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=((1, b"abc"),))
    for end in range(len(data)):
        assert parse_proxy_header(data[:end]) is None, end


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (SIG[:5] + b"\x01", "not a PROXY"),
        (SIG[:-1] + b"\x0b", "not a PROXY"),
        (SIG + b"\x11", "version 1"),
        (SIG + b"\x31", "version 3"),
        (SIG + b"\x22", "command 2"),
        (SIG + b"\x2f", "command 15"),
        (SIG + b"\x21\x13", "0x13"),
        (SIG + b"\x21\x41", "0x41"),
        (SIG + b"\x21\x10", "0x10"),
        (SIG + b"\x21\x01", "0x01"),
        (SIG + b"\x21\x11" + (MAX_V2_PAYLOAD_BYTES + 1).to_bytes(2, "big"), "over"),
        (SIG + b"\x21\x11\xff\xff", "over"),
        (SIG + b"\x21\x11\x00\x0b" + bytes(11), "too short"),
        (SIG + b"\x21\x21\x00\x0c" + bytes(12), "too short"),
        (SIG + b"\x21\x11\x00\x0e" + bytes(14), "truncated v2 TLV header"),
        (SIG + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x02x", "truncated v2 TLV value"),
        (SIG + b"\x21\x00\x00\x01\x00", "truncated v2 TLV header"),
    ],
)
def test_v2_invalid(data: bytes, match: str) -> None:
    with pytest.raises(ProxyHeaderError, match=match):
        parse_proxy_header(data)


def test_v2_payload_at_the_bound_is_accepted() -> None:
    tlvs = ((0xE1, bytes(MAX_V2_PAYLOAD_BYTES - 12 - 3)),)
    data = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=tlvs)
    assert len(data) == 16 + MAX_V2_PAYLOAD_BYTES
    result = parse_proxy_header(data)
    assert result is not None and result[0].tlvs == tlvs


# --- Encoder errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (("1.2.3", 1), "invalid ip"),
        (("example.com", 1), "invalid ip"),
        (("1.2.3.4", -1), "invalid port"),
        (("1.2.3.4", 65536), "invalid port"),
        (("1.2.3.4", "80"), "invalid port"),
        (("1.2.3.4", True), "invalid port"),
        ((b"1.2.3.4", 80), "not a str"),
        (("1.2.3.4",), "not a \\(host, port\\)"),
        (["1.2.3.4", 80], "not a \\(host, port\\)"),
    ],
)
def test_encoders_reject_bad_addresses(source: object, match: str) -> None:
    with pytest.raises(ProxyHeaderError, match=match):
        encode_v1(source, ("1.2.3.4", 80))  # type: ignore[arg-type]
    with pytest.raises(ProxyHeaderError, match=match):
        encode_v2(source, ("1.2.3.4", 80))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"command": "proxy"}, "unknown command"),
        ({"tlvs": ((256, b""),)}, "TLV type"),
        ({"tlvs": ((-1, b""),)}, "TLV type"),
        ({"tlvs": ((1, "text"),)}, "TLV value"),
        ({"tlvs": ((1, bytes(65536)),)}, "TLV value"),
        ({"tlvs": ((1, bytes(MAX_V2_PAYLOAD_BYTES)),)}, "payload over"),
    ],
)
def test_encode_v2_rejects_bad_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ProxyHeaderError, match=match):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), **kwargs)  # type: ignore[arg-type]


# --- Properties ----------------------------------------------------------------

ports = st.integers(0, 65535)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4).map(tuple)


@st.composite
def address_pairs(draw: st.DrawFn) -> tuple[tuple[str, int], tuple[str, int]]:
    version = draw(st.sampled_from([4, 6]))
    src = draw(st.ip_addresses(v=version))
    dst = draw(st.ip_addresses(v=version))
    return (str(src), draw(ports)), (str(dst), draw(ports))


@st.composite
def valid_headers(draw: st.DrawFn) -> bytes:
    src, dst = draw(address_pairs())
    kind = draw(st.sampled_from(["v1", "v2", "local", "unknown"]))
    if kind == "v1":
        return encode_v1(src, dst)
    if kind == "v2":
        return encode_v2(src, dst, tlvs=draw(tlv_lists))
    if kind == "local":
        return encode_v2(None, None, command="LOCAL", tlvs=draw(tlv_lists))
    return encode_v1(None, None)


@FAST
@given(address_pairs())
def test_v1_round_trip(pair: tuple[tuple[str, int], tuple[str, int]]) -> None:
    src, dst = pair
    data = encode_v1(src, dst)
    assert len(data) <= V1_MAX_LINE
    header, consumed = parse_proxy_header(data + b"payload") or (None, 0)
    assert header is not None and consumed == len(data)
    assert header.family == ("TCP4" if ":" not in src[0] else "TCP6")
    assert (header.source, header.destination) == (src, dst)


@FAST
@given(address_pairs(), tlv_lists)
def test_v2_round_trip(
    pair: tuple[tuple[str, int], tuple[str, int]], tlvs: tuple[tuple[int, bytes], ...]
) -> None:
    src, dst = pair
    data = encode_v2(src, dst, tlvs=tlvs)
    header, consumed = parse_proxy_header(data + b"payload") or (None, 0)
    assert header is not None and consumed == len(data)
    assert (header.version, header.command) == (2, "PROXY")
    assert (header.source, header.destination, header.tlvs) == (src, dst, tlvs)


@FAST
@given(valid_headers(), st.data())
def test_every_strict_prefix_needs_more(data: bytes, draw: st.DataObject) -> None:
    end = draw.draw(st.integers(0, len(data) - 1))
    assert parse_proxy_header(data[:end]) is None
    result = parse_proxy_header(data)
    assert result is not None and result[1] == len(data)


@FAST
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=120).map(lambda b: b"PROXY " + b),
        st.binary(max_size=300).map(lambda b: SIG + b),
    )
)
def test_arbitrary_bytes_only_none_header_or_error(data: bytes) -> None:
    result = outcome(data)
    if isinstance(result, tuple):
        header, consumed = result
        assert isinstance(header, ProxyHeader) and 0 < consumed <= len(data)
    else:
        assert result is None or result == "error"


@FAST
@given(valid_headers(), st.data())
def test_mutations_of_valid_headers(data: bytes, draw: st.DataObject) -> None:
    mutated = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 3))):
        mutated[draw.draw(st.integers(0, len(data) - 1))] = draw.draw(st.integers(0, 255))
    result = outcome(bytes(mutated))
    assert result is None or result == "error" or isinstance(result[0], ProxyHeader)


@FAST
@given(st.one_of(valid_headers(), st.binary(max_size=120)), st.binary(max_size=40), st.data())
def test_answers_are_stable_as_bytes_arrive(
    header: bytes, extra: bytes, draw: st.DataObject
) -> None:
    """An error or a header never turns into something else with more bytes."""
    full = header + extra
    cut = draw.draw(st.integers(0, len(full)))
    early, late = outcome(full[:cut]), outcome(full)
    if early is not None:
        assert late == early
