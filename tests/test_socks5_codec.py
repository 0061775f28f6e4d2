"""Tests for the pure SOCKS5 server codec (triofwd._socks5): table tests for each
message, the encoders and the reason mapping, and hypothesis fuzzing — arbitrary bytes
raise nothing but Socks5Error, and however the bytes are split the events are the same."""

from __future__ import annotations

import errno
import itertools
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triofwd import Reason
from triofwd._socks5 import (
    _REASON_REPLIES,
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    CMD_BIND,
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    MAX_AUTH_BYTES,
    MAX_GREETING_BYTES,
    MAX_REQUEST_BYTES,
    METHOD_GSSAPI,
    METHOD_NO_ACCEPTABLE,
    METHOD_NO_AUTH,
    METHOD_USERNAME_PASSWORD,
    NEED_DATA,
    REP_ADDRESS_TYPE_NOT_SUPPORTED,
    REP_COMMAND_NOT_SUPPORTED,
    REP_CONNECTION_REFUSED,
    REP_GENERAL_FAILURE,
    REP_HOST_UNREACHABLE,
    REP_NETWORK_UNREACHABLE,
    REP_NOT_ALLOWED,
    REP_SUCCEEDED,
    REP_TTL_EXPIRED,
    ConnectRequest,
    Event,
    Greeting,
    Socks5Error,
    Socks5Server,
    UnsupportedCommand,
    UsernamePassword,
    choose_method,
    encode_auth_status,
    encode_method_selection,
    encode_reply,
    reply_for_errno,
    reply_for_reason,
)

FAST = settings(max_examples=300, deadline=None)
#: The words the contract adds for these routes (CONTRACT.md), whether or not Reason has them yet.
CONTRACT_WORDS = {str(r) for r in Reason} | {"auth_failed", "destination_denied"}


# --- Client messages, built by hand from RFC 1928/1929 -------------------------------


def greeting(*methods: int) -> bytes:
    return bytes((5, len(methods), *methods))


def auth(user: bytes, password: bytes, version: int = 1) -> bytes:
    return bytes((version, len(user))) + user + bytes((len(password),)) + password


def request(host: str | bytes, port: int, *, cmd: int = CMD_CONNECT, atyp: int | None = None) -> bytes:
    if isinstance(host, bytes):
        atyp = ATYP_DOMAIN if atyp is None else atyp
        address = bytes((len(host),)) + host
    elif ":" in host:
        atyp, address = ATYP_IPV6, socket.inet_pton(socket.AF_INET6, host)
    else:
        atyp, address = ATYP_IPV4, socket.inet_aton(host)
    return bytes((5, cmd, 0, atyp)) + address + struct.pack("!H", port)


def run(data: bytes | list[bytes], *, auth_required: bool = False, good: tuple[bytes, bytes] | None = None) -> tuple[list[Event], tuple[object, ...]]:
    """Drive a server over ``data`` (one chunk, or a list of chunks, each fed only when the
    codec asks), answering as a route would, with ``good`` the one valid user (None: any
    credentials pass). Returns the events and how it ended:
    ("done", leftover + unread chunks), ("closed",), ("need",) or ("error", message, reply)."""
    server = Socks5Server()
    queue = [data] if isinstance(data, bytes) else list(data)
    events: list[Event] = []
    while True:
        try:
            event = server.next_event()
        except Socks5Error as exc:
            return events, ("error", str(exc), exc.reply)
        if event is NEED_DATA:
            if not queue:
                return events, ("need",)
            server.receive_data(queue.pop(0))
            continue
        events.append(event)
        if isinstance(event, Greeting):
            method = choose_method(event.methods, auth_required=auth_required)
            assert server.select_method(method) == bytes((5, method))
            if method == METHOD_NO_ACCEPTABLE:
                return events, ("closed",)
        elif isinstance(event, UsernamePassword):
            ok = good is None or (event.username, event.password) == good
            assert server.auth_result(ok) == bytes((1, 0 if ok else 1))
            if not ok:
                return events, ("closed",)
        else:
            return events, ("done", server.leftover + b"".join(queue))


# --- Greeting and method selection ---------------------------------------------------


@pytest.mark.parametrize(
    ("methods", "auth_required", "chosen"),
    [
        ((METHOD_NO_AUTH,), False, METHOD_NO_AUTH),
        ((METHOD_NO_AUTH, METHOD_USERNAME_PASSWORD), False, METHOD_NO_AUTH),
        ((METHOD_NO_AUTH, METHOD_USERNAME_PASSWORD), True, METHOD_USERNAME_PASSWORD),
        ((METHOD_USERNAME_PASSWORD,), True, METHOD_USERNAME_PASSWORD),
        ((METHOD_USERNAME_PASSWORD,), False, METHOD_NO_ACCEPTABLE),  # a route without users asks for none
        ((METHOD_NO_AUTH,), True, METHOD_NO_ACCEPTABLE),
        ((METHOD_GSSAPI,), False, METHOD_NO_ACCEPTABLE),
        ((), False, METHOD_NO_ACCEPTABLE),
        ((0x80, 0xFE, METHOD_NO_AUTH), False, METHOD_NO_AUTH),
    ],
)
def test_choose_method(methods: tuple[int, ...], auth_required: bool, chosen: int) -> None:
    assert choose_method(methods, auth_required=auth_required) == chosen


def test_greeting_event() -> None:
    server = Socks5Server()
    server.receive_data(greeting(0, 2, 0x80))
    assert server.next_event() == Greeting(methods=(0, 2, 0x80))
    assert server.select_method(METHOD_NO_AUTH) == b"\x05\x00"


def test_no_acceptable_method_closes() -> None:
    events, end = run(greeting(METHOD_GSSAPI) + request("192.0.2.1", 80))
    assert events == [Greeting((METHOD_GSSAPI,))] and end == ("closed",)


def test_select_method_checks_its_argument() -> None:
    server = Socks5Server()
    server.receive_data(greeting(METHOD_NO_AUTH, METHOD_GSSAPI))
    server.next_event()
    with pytest.raises(ValueError, match="not offered"):
        server.select_method(METHOD_USERNAME_PASSWORD)
    with pytest.raises(ValueError, match="not supported"):
        server.select_method(METHOD_GSSAPI)
    assert server.select_method(METHOD_NO_ACCEPTABLE) == b"\x05\xff"
    with pytest.raises(RuntimeError):
        server.next_event()


# --- Username/password (RFC 1929) ---------------------------------------------------


def test_username_password_accepted() -> None:
    data = greeting(0, 2) + auth(b"alice", b"secret") + request("192.0.2.1", 443) + b"hello"
    events, end = run(data, auth_required=True, good=(b"alice", b"secret"))
    assert events == [Greeting((0, 2)), UsernamePassword(b"alice", b"secret"), ConnectRequest("192.0.2.1", 443, ATYP_IPV4)]
    assert end == ("done", b"hello")


def test_username_password_refused_closes() -> None:
    events, end = run(greeting(2) + auth(b"alice", b"wrong") + request("192.0.2.1", 443), auth_required=True, good=(b"alice", b"secret"))
    assert events[-1] == UsernamePassword(b"alice", b"wrong") and end == ("closed",)


@pytest.mark.parametrize(
    ("user", "password"),
    [(b"a", b"b"), (b"", b""), (b"\xff\x00", b"\x00"), (b"u" * 255, b"p" * 255), ("zoë".encode(), "пароль".encode())],
)
def test_credentials_as_sent(user: bytes, password: bytes) -> None:
    events, _ = run(greeting(2) + auth(user, password), auth_required=True, good=(user, password))
    assert events[1] == UsernamePassword(user, password)


def test_bad_auth_version() -> None:
    events, end = run(greeting(2) + auth(b"a", b"b", version=5), auth_required=True)
    assert len(events) == 1 and end[0] == "error" and "RFC 1929" in str(end[1]) and end[2] is None


def test_auth_result_only_after_credentials() -> None:
    server = Socks5Server()
    with pytest.raises(RuntimeError):
        server.auth_result(True)
    with pytest.raises(RuntimeError):
        server.select_method(METHOD_NO_AUTH)


# --- Requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "event"),
    [
        (request("192.0.2.7", 443), ConnectRequest("192.0.2.7", 443, ATYP_IPV4)),
        (request("0.0.0.0", 0), ConnectRequest("0.0.0.0", 0, ATYP_IPV4)),
        (request("2001:db8::1", 8443), ConnectRequest("2001:db8::1", 8443, ATYP_IPV6)),
        (request("::ffff:127.0.0.1", 80), ConnectRequest("::ffff:7f00:1", 80, ATYP_IPV6)),
        (request(b"example.com", 443), ConnectRequest("example.com", 443, ATYP_DOMAIN)),
        (request(b"Example.COM.", 443), ConnectRequest("example.com", 443, ATYP_DOMAIN)),
        (request(b"x" * 63 + b"." + b"y" * 63 + b"." + b"z" * 63 + b"." + b"w" * 61, 65535), ConnectRequest("x" * 63 + "." + "y" * 63 + "." + "z" * 63 + "." + "w" * 61, 65535, ATYP_DOMAIN)),
        # an address sent as a name is given as that address (and judged as one)
        (request(b"127.0.0.1", 22), ConnectRequest("127.0.0.1", 22, ATYP_DOMAIN)),
        (request(b"[2001:DB8::1]", 22), ConnectRequest("2001:db8::1", 22, ATYP_DOMAIN)),
        (request("192.0.2.7", 80, cmd=CMD_BIND), UnsupportedCommand(CMD_BIND, "192.0.2.7", 80, ATYP_IPV4)),
        (request(b"example.com", 53, cmd=CMD_UDP_ASSOCIATE), UnsupportedCommand(CMD_UDP_ASSOCIATE, "example.com", 53, ATYP_DOMAIN)),
        (request("2001:db8::1", 1, cmd=0x00), UnsupportedCommand(0x00, "2001:db8::1", 1, ATYP_IPV6)),
        (request("192.0.2.7", 1, cmd=0x99), UnsupportedCommand(0x99, "192.0.2.7", 1, ATYP_IPV4)),
    ],
)
def test_requests(data: bytes, event: Event) -> None:
    events, end = run(greeting(0) + data + b"\x16\x03\x01")
    assert events == [Greeting((0,)), event]
    assert end == ("done", b"\x16\x03\x01")


def test_reserved_byte_is_ignored() -> None:
    data = bytearray(request("192.0.2.7", 443))
    data[2] = 0xAA
    events, _ = run(greeting(0) + bytes(data))
    assert events[-1] == ConnectRequest("192.0.2.7", 443, ATYP_IPV4)


@pytest.mark.parametrize(
    ("data", "match", "reply"),
    [
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", "SOCKS4 is not supported", None),
        (b"GET / HTTP/1.1\r\n\r\n", "not SOCKS5: version byte 0x47", None),
        (b"\x00", "not SOCKS5", None),
        (greeting(0) + b"\x04\x01\x00\x01", "request version 0x04", None),
        (greeting(0) + b"\x05\x01\x00\x02", "address type 0x02 is not supported", REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (greeting(0) + b"\x05\x01\x00\x00", "address type 0x00", REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (greeting(0) + b"\x05\x01\x00\xff", "address type 0xff", REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (greeting(0) + b"\x05\x02\x00\x05", "address type", REP_ADDRESS_TYPE_NOT_SUPPORTED),  # before the command
        (greeting(0) + request(b"", 80), "empty domain name", REP_HOST_UNREACHABLE),
        (greeting(0) + request(b"bad name", 80), "not a host name", REP_HOST_UNREACHABLE),
        (greeting(0) + request(b"a..b", 80), "not a host name", REP_HOST_UNREACHABLE),
        (greeting(0) + request("bücher.de".encode(), 80), "not a host name", REP_HOST_UNREACHABLE),
        (greeting(0) + request(b"evil\x00.com", 80), "not a host name", REP_HOST_UNREACHABLE),
        (greeting(0) + request(b"fe80::1%eth0", 80), "not a host name", REP_HOST_UNREACHABLE),
        (greeting(0) + request(b"a" * 255, 80), "not a host name", REP_HOST_UNREACHABLE),
    ],
)
def test_protocol_errors(data: bytes, match: str, reply: int | None) -> None:
    _, end = run(data)
    assert end[0] == "error" and match in str(end[1]), end
    assert end[2] == reply


def test_errors_come_as_soon_as_the_byte_that_shows_them() -> None:
    """A SOCKS4 or HTTP client is refused on its first byte, a bad address type on the
    request's fourth: no waiting for bytes that would not help."""
    assert run([b"\x04"])[1][0] == "error"
    assert run([greeting(0), b"\x05\x01\x00\x07"])[1][0] == "error"
    assert run([greeting(0), b"\x05\x01\x00\x03"])[1] == ("need",)


def test_bind_and_udp_associate_get_command_not_supported() -> None:
    for cmd in (CMD_BIND, CMD_UDP_ASSOCIATE):
        event = run(greeting(0) + request("192.0.2.7", 80, cmd=cmd))[0][-1]
        assert isinstance(event, UnsupportedCommand) and event.command == cmd
        assert encode_reply(REP_COMMAND_NOT_SUPPORTED) == b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"


# --- Pipelining, leftover and bounds ------------------------------------------------


def test_whole_handshake_and_data_in_one_read() -> None:
    """An optimistic client sends everything before any answer: each message waits its
    turn, and what follows the request is the forward path's initial data."""
    data = greeting(0, 2) + auth(b"alice", b"secret") + request(b"example.com", 443) + b"\x16\x03\x01" + b"x" * 5000
    events, end = run(data, auth_required=True)
    assert [type(e) for e in events] == [Greeting, UsernamePassword, ConnectRequest]
    assert end == ("done", b"\x16\x03\x01" + b"x" * 5000)


def test_answers_wait_for_the_server() -> None:
    server = Socks5Server()
    server.receive_data(greeting(0) + request("192.0.2.1", 1))
    assert isinstance(server.next_event(), Greeting)
    with pytest.raises(RuntimeError, match="select_method"):
        server.next_event()
    with pytest.raises(RuntimeError, match="receive_data"):
        server.receive_data(b"more")  # reading on while our answer is owed: refused
    with pytest.raises(RuntimeError):
        _ = server.leftover
    server.select_method(METHOD_NO_AUTH)
    assert isinstance(server.next_event(), ConnectRequest)
    assert server.leftover == b""
    with pytest.raises(RuntimeError):
        server.next_event()


def test_receive_data_only_when_asked() -> None:
    server = Socks5Server()
    server.receive_data(b"\x05")
    with pytest.raises(RuntimeError):
        server.receive_data(b"\x01")
    assert server.next_event() is NEED_DATA
    server.receive_data(b"\x01\x00")
    assert server.next_event() == Greeting((0,))


@pytest.mark.parametrize(
    "data",
    [
        greeting(*range(255)),
        greeting(2) + auth(b"u" * 255, b"p" * 255),
        greeting(0) + request(b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 61, 1),
        greeting(0) + request(b"a" * 255, 1),  # longest possible, refused once read whole
    ],
)
def test_buffer_stays_within_one_message(data: bytes) -> None:
    """Byte by byte, the codec never holds more than the longest message it is reading."""
    server = Socks5Server()
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
        assert len(server._buffer) <= max(MAX_GREETING_BYTES, MAX_AUTH_BYTES, MAX_REQUEST_BYTES)
        try:
            event = server.next_event()
        except Socks5Error:
            assert i == len(data) - 1 and len(data) - len(greeting(0)) == MAX_REQUEST_BYTES
            return
        while event is not NEED_DATA:
            if isinstance(event, Greeting):
                server.select_method(choose_method(event.methods, auth_required=event.methods == (2,)))
            elif isinstance(event, UsernamePassword):
                server.auth_result(True)
            else:
                assert i == len(data) - 1 and server.leftover == b""
                return
            event = server.next_event()
    assert not server._buffer


# --- Encoders -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rep", "bound", "wire"),
    [
        (REP_SUCCEEDED, ("192.0.2.7", 40000), b"\x05\x00\x00\x01\xc0\x00\x02\x07\x9c\x40"),
        (REP_SUCCEEDED, ("2001:db8::1", 443), b"\x05\x00\x00\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + b"\x01\xbb"),
        (REP_SUCCEEDED, ("fe80::1%eth0", 1), b"\x05\x00\x00\x04" + socket.inet_pton(socket.AF_INET6, "fe80::1") + b"\x00\x01"),
        (REP_NOT_ALLOWED, None, b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"),
        (REP_ADDRESS_TYPE_NOT_SUPPORTED, None, b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00"),
    ],
)
def test_encode_reply(rep: int, bound: tuple[str, int] | None, wire: bytes) -> None:
    assert encode_reply(rep, bound) == wire


@pytest.mark.parametrize(("rep", "bound"), [(256, None), (-1, None), (0, ("example.com", 1)), (0, ("192.0.2.1", 65536)), (0, ("192.0.2.1", -1))])
def test_encode_reply_refuses(rep: int, bound: tuple[str, int] | None) -> None:
    with pytest.raises(ValueError):
        encode_reply(rep, bound)


def test_small_encoders() -> None:
    assert encode_method_selection(METHOD_USERNAME_PASSWORD) == b"\x05\x02"
    assert encode_method_selection(METHOD_NO_ACCEPTABLE) == b"\x05\xff"
    assert encode_auth_status(True) == b"\x01\x00"
    assert encode_auth_status(False) == b"\x01\x01"
    with pytest.raises(ValueError):
        encode_method_selection(300)


# --- Reasons -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "rep"),
    [
        ("connect_refused", REP_CONNECTION_REFUSED),
        ("connect_timeout", REP_TTL_EXPIRED),
        ("target_unreachable", REP_HOST_UNREACHABLE),
        ("dns_error", REP_HOST_UNREACHABLE),
        ("destination_denied", REP_NOT_ALLOWED),
        ("auth_failed", REP_NOT_ALLOWED),
        (Reason.CONNECT_REFUSED, REP_CONNECTION_REFUSED),
        (Reason.INTERNAL_ERROR, REP_GENERAL_FAILURE),
        ("shutdown", REP_GENERAL_FAILURE),
        ("not a word", REP_GENERAL_FAILURE),
    ],
)
def test_reply_for_reason(reason: str, rep: int) -> None:
    assert reply_for_reason(reason) == rep


def test_reply_words_are_the_contracts() -> None:
    assert set(_REASON_REPLIES) <= CONTRACT_WORDS


@pytest.mark.parametrize(
    ("code", "rep"),
    [
        (errno.ENETUNREACH, REP_NETWORK_UNREACHABLE),
        (errno.EHOSTUNREACH, REP_HOST_UNREACHABLE),
        (errno.ECONNREFUSED, REP_CONNECTION_REFUSED),
        (errno.ETIMEDOUT, REP_TTL_EXPIRED),
        (errno.EACCES, REP_GENERAL_FAILURE),
        (None, REP_GENERAL_FAILURE),
    ],
)
def test_reply_for_errno(code: int | None, rep: int) -> None:
    assert reply_for_errno(code) == rep


# --- Fuzzing -------------------------------------------------------------------------

hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,4}", fullmatch=True).map(str.encode),
)


@st.composite
def handshakes(draw: st.DrawFn) -> tuple[bytes, bool]:
    """What a valid client sends for one route, and whether that route has users."""
    auth_required = draw(st.booleans())
    methods = draw(st.lists(st.integers(0, 255), max_size=6))
    if draw(st.booleans()):
        methods.append(METHOD_USERNAME_PASSWORD if auth_required else METHOD_NO_AUTH)
    data = greeting(*methods)
    if choose_method(tuple(methods), auth_required=auth_required) == METHOD_USERNAME_PASSWORD:
        data += auth(draw(st.binary(max_size=255)), draw(st.binary(max_size=255)))
    data += request(draw(hosts), draw(st.integers(0, 65535)), cmd=draw(st.sampled_from([CMD_CONNECT, CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE, 0x42])))
    return data + draw(st.binary(max_size=30)), auth_required


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@FAST
@given(st.one_of(st.binary(max_size=600), st.binary(max_size=300).map(lambda b: b"\x05" + b), st.binary(max_size=300).map(lambda b: greeting(0) + b"\x05" + b)), st.booleans())
def test_arbitrary_bytes_raise_only_socks5_error(data: bytes, auth_required: bool) -> None:
    events, end = run(data, auth_required=auth_required, good=(b"", b""))
    assert end[0] in ("done", "closed", "need", "error")
    assert all(isinstance(e, Greeting | UsernamePassword | ConnectRequest | UnsupportedCommand) for e in events)
    if end[0] == "error":
        assert end[2] in (None, REP_ADDRESS_TYPE_NOT_SUPPORTED, REP_HOST_UNREACHABLE)


@FAST
@given(handshakes())
def test_valid_handshakes_complete(case: tuple[bytes, bool]) -> None:
    data, auth_required = case
    events, end = run(data, auth_required=auth_required)
    assert end[0] in ("done", "closed")
    if end[0] == "done":
        assert isinstance(events[-1], ConnectRequest | UnsupportedCommand)


@FAST
@given(st.one_of(handshakes(), st.tuples(st.binary(max_size=300), st.booleans())), st.lists(st.integers(0, 10_000), max_size=10))
def test_any_chunking_gives_the_same_events(case: tuple[bytes, bool], cuts: list[int]) -> None:
    data, auth_required = case
    whole = run(data, auth_required=auth_required)
    assert run(chunked(data, cuts), auth_required=auth_required) == whole
    assert run([data[i : i + 1] for i in range(len(data))], auth_required=auth_required) == whole


@FAST
@given(handshakes(), st.data())
def test_mutated_handshakes_raise_only_socks5_error(case: tuple[bytes, bool], draw: st.DataObject) -> None:
    data, auth_required = case
    mutated = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        mutated[draw.draw(st.integers(0, len(data) - 1))] = draw.draw(st.integers(0, 255))
    run(bytes(mutated), auth_required=auth_required)  # any Socks5Error is folded into the result


@FAST
@given(handshakes(), st.data())
def test_truncated_handshakes_need_more(case: tuple[bytes, bool], draw: st.DataObject) -> None:
    data, auth_required = case
    complete = run(data, auth_required=auth_required)
    if complete[1][0] != "done":
        return
    # every prefix that ends before the request does asks for more (never an error)
    leftover = complete[1][1]
    assert isinstance(leftover, bytes)
    end = draw.draw(st.integers(0, len(data) - len(leftover) - 1))
    assert run(data[:end], auth_required=auth_required)[1] in (("need",), ("closed",))
