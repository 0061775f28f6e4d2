"""Tests for the pure TLS ClientHello parser (triofwd._clienthello)."""

from __future__ import annotations

import functools
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triofwd._clienthello import MAX_HELLO_BYTES, ClientHello, ClientHelloError, looks_like_tls, parse_client_hello
from triofwd.testing import build_client_hello

FAST = settings(max_examples=300, deadline=None)


def _openssl_hello(server_hostname: str | None) -> bytes:
    """The first flight Python's ssl module sends as a client."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    if server_hostname is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@functools.cache
def real_hello() -> bytes:
    return _openssl_hello("example.com")


def resplit(hello: bytes, count: int) -> bytes:
    """Re-wrap a single-record hello's handshake message into ``count`` records."""
    assert hello[0] == 22 and int.from_bytes(hello[3:5], "big") == len(hello) - 5
    message = hello[5:]
    out = b""
    for i in range(count):
        fragment = message[i * len(message) // count : (i + 1) * len(message) // count]
        out += b"\x16\x03\x03" + len(fragment).to_bytes(2, "big") + fragment
    return out


def record(payload: bytes, content_type: int = 22, version: bytes = b"\x03\x01") -> bytes:
    return bytes((content_type,)) + version + len(payload).to_bytes(2, "big") + payload


def outcome(data: bytes) -> ClientHello | str | None:
    """The parser's answer, with its one allowed exception folded into a value."""
    try:
        return parse_client_hello(data)
    except ClientHelloError:
        return "error"


# --- Examples ------------------------------------------------------------------


def test_real_openssl_hello() -> None:
    data = real_hello()
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.server_name == "example.com"
    assert hello.alpn == ("h2", "http/1.1")
    assert 0x0304 in hello.supported_versions
    assert hello.legacy_version == 0x0303
    assert hello.record_bytes == len(data)


def test_real_hello_byte_by_byte() -> None:
    data = real_hello()
    for end in range(len(data)):
        assert parse_client_hello(data[:end]) is None, end
    assert parse_client_hello(data) == parse_client_hello(data + b"\x17\x03\x03")


def test_bytes_after_hello_are_not_consumed() -> None:
    data = real_hello()
    hello = parse_client_hello(data + b"\x17\x03\x03\x00\x05hello")
    assert hello is not None and hello.record_bytes == len(data)


@pytest.mark.parametrize("count", [2, 3, 7, 100])
def test_real_hello_split_over_records(count: int) -> None:
    data = resplit(real_hello(), count)
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.server_name == "example.com"
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.record_bytes == len(data) == len(real_hello()) + 5 * (count - 1)
    for end in range(len(data)):
        assert parse_client_hello(data[:end]) is None, end


def test_real_hello_without_sni() -> None:
    hello = parse_client_hello(_openssl_hello(None))
    assert hello is not None
    assert hello.server_name is None
    assert hello.alpn == ("h2", "http/1.1")


def test_builder_without_sni_or_alpn() -> None:
    hello = parse_client_hello(build_client_hello(None))
    assert hello == ClientHello(
        server_name=None,
        alpn=(),
        legacy_version=0x0303,
        supported_versions=(0x0304, 0x0303),
        record_bytes=len(build_client_hello(None)),
    )


@pytest.mark.parametrize(
    ("sent", "parsed"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("_acme.a-b.example", "_acme.a-b.example"),
        ("localhost", "localhost"),
    ],
)
def test_server_name_normalisation(sent: str, parsed: str) -> None:
    hello = parse_client_hello(build_client_hello(sent))
    assert hello is not None and hello.server_name == parsed


@pytest.mark.parametrize(
    "name", ["", ".", "a..b", "exa mple.com", "a/b", "a\x00b", "a" * 64 + ".com", "a." * 127 + "a"]
)
def test_bad_server_names(name: str) -> None:
    with pytest.raises(ClientHelloError):
        parse_client_hello(build_client_hello(name))


def test_non_ascii_server_name() -> None:
    good = build_client_hello("abc.example")
    bad = good.replace(b"abc.example", b"\xe4bc.example")
    assert len(bad) == len(good)
    with pytest.raises(ClientHelloError, match="ASCII"):
        parse_client_hello(bad)


def test_alpn_is_latin1_lossless() -> None:
    grease = "\x8a\x8a"  # RFC 8701 GREASE ALPN value, not ASCII
    hello = parse_client_hello(build_client_hello("a.example", [grease, "h2"]))
    assert hello is not None and hello.alpn == (grease, "h2")


def test_plain_http_is_rejected_at_first_byte() -> None:
    with pytest.raises(ClientHelloError):
        parse_client_hello(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ClientHelloError):
        parse_client_hello(b"G")


def test_empty_and_tiny_prefixes_need_more() -> None:
    assert parse_client_hello(b"") is None
    assert parse_client_hello(b"\x16") is None
    assert parse_client_hello(b"\x16\x03\x01\x02\x00\x01") is None


def _message(body: bytes, msg_type: int = 1) -> bytes:
    return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body


#: legacy_version, random, empty session id, one suite, null compression.
_FIXED_FIELDS = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"


def test_oversize_hello_is_rejected_early() -> None:
    # A well-formed hello made huge by one 65531-byte unknown extension, in
    # records of at most 2^14: the handshake header alone announces the excess.
    message = _message(_FIXED_FIELDS + b"\xff\xff\x12\x34\xff\xfb" + bytes(65531))
    data = b"".join(record(message[i : i + 2**14]) for i in range(0, len(message), 2**14))
    assert len(data) > MAX_HELLO_BYTES
    with pytest.raises(ClientHelloError, match="exceeds"):
        parse_client_hello(data)
    with pytest.raises(ClientHelloError, match="exceeds"):
        parse_client_hello(data[:9])


def test_hello_just_under_the_bound_is_accepted() -> None:
    data = build_client_hello("big.example", ["x" * 255] * 240, split_records=4)
    assert 60_000 < len(data) <= MAX_HELLO_BYTES
    hello = parse_client_hello(data)
    assert hello is not None and len(hello.alpn) == 240


def test_many_tiny_records_hit_the_bound() -> None:
    # One handshake byte per record: 6 wire bytes per byte of hello.
    message = build_client_hello("a.example", ["y" * 200] * 60)[5:]
    data = b"".join(record(message[i : i + 1]) for i in range(len(message)))
    assert len(data) > MAX_HELLO_BYTES
    with pytest.raises(ClientHelloError, match="exceeds"):
        parse_client_hello(data)




_GOOD = build_client_hello("a.example", ["h2"])
_GOOD_BODY = _GOOD[9:]
_SNI_EXT = b"\x00\x00\x00\x0e\x00\x0c\x00\x00\x09a.example"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x17\x03\x03\x00\x01\x00", "content type 23"),
        (b"\x80\x2e\x01\x03\x01", "content type 128"),
        (b"\x16\x02\x00", "record-layer version"),
        (b"\x16\x03\x05", "record-layer version"),
        (b"\x16\x03\x01\x00\x00", "empty handshake record"),
        (b"\x16\x03\x01\x40\x01", "exceeds 2\\^14"),
        (record(b"\x02\x00\x00\x00"), "type 2 is not"),
        (record(b"\x02"), "type 2 is not"),
        (b"\x16\x03\x01\x00\x50\x02", "type 2 is not"),
        (record(_message(b"\x03\x03")), "truncated random"),
        (record(_message(_GOOD_BODY) + b"\x00"), "trailing bytes after"),
        (record(_message(_GOOD_BODY + b"\x00")), "trailing bytes in ClientHello"),
        (record(_message(b"\x02\x00" + _GOOD_BODY[2:])), "legacy_version 0x0200"),
        (
            record(_message(_GOOD_BODY[:34] + b"\x21" + bytes(33) + _GOOD_BODY[35:])),
            "legacy_session_id longer",
        ),
        (
            record(_GOOD[5:40]) + record(b"\x00", content_type=20) + record(_GOOD[40:]),
            "content type 20",
        ),
    ],
)
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(ClientHelloError, match=match):
        parse_client_hello(data)


def _with_extensions(extensions: bytes) -> bytes:
    """A hello with our fixed fields and the given raw extensions block."""
    return record(_message(_FIXED_FIELDS + len(extensions).to_bytes(2, "big") + extensions))


def test_fixed_fields_hello_parses() -> None:
    hello = parse_client_hello(_with_extensions(_SNI_EXT))
    assert hello is not None and hello.server_name == "a.example"


def test_hello_without_extensions_block() -> None:
    # RFC 5246 §7.4.1.2: extensions may be absent altogether.
    hello = parse_client_hello(record(_message(_FIXED_FIELDS)))
    assert hello is not None
    assert (hello.server_name, hello.alpn, hello.supported_versions) == (None, (), ())


@pytest.mark.parametrize(
    ("extensions", "match"),
    [
        (_SNI_EXT + _SNI_EXT, "duplicate extension 0"),
        (b"\x00\x00\x00\x02\x00\x00", "server_name_list shorter"),
        (b"\x00\x00\x00\x0a\x00\x08\x00\x00\x06a.exa", "truncated server name"),
        (b"\x00\x10\x00\x02\x00\x00", "protocol_name_list shorter"),
        (b"\x00\x10\x00\x04\x00\x02\x00\x00", "protocol name shorter"),
        (b"\x00\x2b\x00\x04\x03\x03\x04\x03", "odd supported_versions"),
        (b"\x00\x2b\x00\x01\x00", "supported_versions shorter"),
        (b"\x00\x2b\x00\x04\x02\x03\x04\x00", "trailing bytes in supported_versions"),
        (b"\x00\x2b\x00\x09", "truncated extension data"),
        (
            b"\x00\x00\x00\x0e\x00\x0c\x00\x00\x03a.b\x00\x00\x03c.d",
            "more than one host_name",
        ),
    ],
)
def test_malformed_extensions(extensions: bytes, match: str) -> None:
    with pytest.raises(ClientHelloError, match=match):
        parse_client_hello(_with_extensions(extensions))


def test_unknown_name_type_is_skipped() -> None:
    sni = b"\x00\x00\x00\x13\x00\x11\x07\x00\x02zz\x00\x00\x09a.example"
    hello = parse_client_hello(_with_extensions(sni))
    assert hello is not None and hello.server_name == "a.example"


def test_looks_like_tls() -> None:
    assert looks_like_tls(real_hello()[0])
    assert not looks_like_tls(ord("G"))
    assert not looks_like_tls(0x80)


def test_builder_rejects_what_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        build_client_hello("a.example", ["x" * 255] * 300)  # ALPN over 2^16
    with pytest.raises(ValueError):
        build_client_hello("a.example", ["x" * 256])
    with pytest.raises(ValueError):
        build_client_hello("a.example", split_records=0)
    with pytest.raises(ValueError):
        build_client_hello("a.example", split_records=10_000)


# --- Properties ----------------------------------------------------------------

labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
host_names = st.lists(labels, min_size=1, max_size=4).map(".".join)
alpn_names = st.text(st.characters(min_codepoint=0, max_codepoint=255), min_size=1, max_size=20)
alpn_lists = st.lists(alpn_names, max_size=5).map(tuple)


@st.composite
def valid_hellos(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return resplit(real_hello(), draw(st.integers(1, 30)))
    return build_client_hello(
        draw(st.none() | host_names), draw(alpn_lists), split_records=draw(st.integers(1, 20))
    )


@FAST
@given(st.binary(max_size=600) | st.binary(max_size=600).map(lambda b: b"\x16\x03\x01" + b))
def test_arbitrary_bytes_only_none_hello_or_error(data: bytes) -> None:
    result = outcome(data)
    assert result is None or result == "error" or isinstance(result, ClientHello)
    if isinstance(result, ClientHello):
        assert result.record_bytes <= len(data)


@FAST
@given(host_names, alpn_lists, st.integers(1, 20))
def test_builder_round_trip(name: str, alpn: tuple[str, ...], split: int) -> None:
    data = build_client_hello(name, alpn, split_records=split)
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.server_name == name
    assert hello.alpn == alpn
    assert hello.record_bytes == len(data)


@FAST
@given(valid_hellos(), st.data())
def test_truncations_of_valid_hellos_need_more(data: bytes, draw: st.DataObject) -> None:
    end = draw.draw(st.integers(0, len(data) - 1))
    assert parse_client_hello(data[:end]) is None
    assert isinstance(parse_client_hello(data), ClientHello)


@FAST
@given(valid_hellos(), st.data())
def test_mutations_of_valid_hellos(data: bytes, draw: st.DataObject) -> None:
    mutated = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        mutated[draw.draw(st.integers(0, len(data) - 1))] = draw.draw(st.integers(0, 255))
    cut = draw.draw(st.integers(0, len(mutated)))
    result = outcome(bytes(mutated[:cut]))
    assert result is None or result == "error" or isinstance(result, ClientHello)


@FAST
@given(st.one_of(valid_hellos(), st.binary(max_size=300)), st.binary(max_size=50), st.data())
def test_answers_are_stable_as_bytes_arrive(
    hello: bytes, extra: bytes, draw: st.DataObject
) -> None:
    """An error or a hello never turns into something else with more bytes."""
    full = hello + extra
    cut = draw.draw(st.integers(0, len(full)))
    early, late = outcome(full[:cut]), outcome(full)
    if early is not None:
        assert late == early
