"""Tests for the pure HTTP CONNECT reader and responses (triofwd._httpconnect): table
tests, responses read back with h11 as a client would, and hypothesis fuzzing — arbitrary
bytes raise nothing but HttpConnectError, and however they are split the answer is the same."""

from __future__ import annotations

import base64
import itertools

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triofwd import Reason
from triofwd._httpconnect import (
    _REASON_STATUSES,
    ESTABLISHED,
    MAX_HEAD_BYTES,
    ConnectReader,
    ConnectRequest,
    HttpConnectError,
    response,
    status_for_reason,
)

FAST = settings(max_examples=300, deadline=None)
CONTRACT_WORDS = {str(r) for r in Reason} | {"auth_failed", "destination_denied"}


def basic(user: bytes, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user + b":" + password)


def head(target: bytes = b"example.com:443", *headers: bytes, method: bytes = b"CONNECT", version: bytes = b"1.1", host: bool = True) -> bytes:
    lines = [method + b" " + target + b" HTTP/" + version]
    if host:
        lines.append(b"Host: " + target)
    lines += headers
    return b"\r\n".join(lines) + b"\r\n\r\n"


def outcome(chunks: bytes | list[bytes], *, eof: bool = False) -> ConnectRequest | tuple[int, str] | None:
    """The reader's answer after ``chunks`` (then the client's EOF, if ``eof``), with
    leftover and any unfed chunks joined, and its one allowed exception folded into a value."""
    reader = ConnectReader()
    queue = [c for c in ([chunks] if isinstance(chunks, bytes) else chunks) if c]
    if eof:
        queue.append(b"")
    try:
        while queue:
            result = reader.feed(queue.pop(0))
            if result is not None:
                return ConnectRequest(result.host, result.port, result.credentials, result.leftover + b"".join(queue))
    except HttpConnectError as exc:
        return exc.status, str(exc)
    return None


# --- Requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (head(), ConnectRequest("example.com", 443, None, b"")),
        (head(b"Example.COM.:8443"), ConnectRequest("example.com", 8443, None, b"")),
        (head(b"192.0.2.7:22"), ConnectRequest("192.0.2.7", 22, None, b"")),
        (head(b"[2001:DB8::1]:443"), ConnectRequest("2001:db8::1", 443, None, b"")),
        (head(version=b"1.0", host=False), ConnectRequest("example.com", 443, None, b"")),
        (head() + b"\x16\x03\x01rest", ConnectRequest("example.com", 443, None, b"\x16\x03\x01rest")),
        (head(b"example.com:443", b"Proxy-Authorization: " + basic(b"alice", b"s3cret")), ConnectRequest("example.com", 443, (b"alice", b"s3cret"), b"")),
        (head(b"example.com:443", b"proxy-authorization: BASIC " + base64.b64encode(b"alice:")), ConnectRequest("example.com", 443, (b"alice", b""), b"")),
        (head(b"example.com:443", b"Proxy-Authorization: " + basic(b"a", b"b:c")), ConnectRequest("example.com", 443, (b"a", b"b:c"), b"")),
        (head(b"example.com:443", b"Proxy-Authorization: " + basic("zoë".encode(), "пароль".encode())), ConnectRequest("example.com", 443, ("zoë".encode(), "пароль".encode()), b"")),
        # unusable credentials are no credentials: the route answers 407 if it has users
        (head(b"example.com:443", b"Proxy-Authorization: Bearer abc"), ConnectRequest("example.com", 443, None, b"")),
        (head(b"example.com:443", b"Proxy-Authorization: Basic !!!"), ConnectRequest("example.com", 443, None, b"")),
        (head(b"example.com:443", b"Proxy-Authorization: Basic " + base64.b64encode(b"nocolon")), ConnectRequest("example.com", 443, None, b"")),
        (head(b"example.com:443", b"Proxy-Authorization: Basic"), ConnectRequest("example.com", 443, None, b"")),
        (head(b"example.com:443", b"Authorization: " + basic(b"a", b"b")), ConnectRequest("example.com", 443, None, b"")),  # the origin's, not ours
        (head(b"example.com:443", b"Content-Length: 0"), ConnectRequest("example.com", 443, None, b"")),
        (head(b"example.com:443", b"User-Agent: curl/8.5.0", b"Proxy-Connection: Keep-Alive"), ConnectRequest("example.com", 443, None, b"")),
    ],
)
def test_requests(data: bytes, expected: ConnectRequest) -> None:
    assert ConnectReader().feed(data) == expected


@pytest.mark.parametrize(
    ("data", "status", "match"),
    [
        (head(b"/", method=b"GET"), 405, "'GET'"),
        (head(b"http://example.com/", method=b"GET"), 405, "only CONNECT"),
        (head(b"example.com:443", method=b"POST"), 405, "POST"),
        (head(b"*", method=b"OPTIONS"), 405, "OPTIONS"),
        (head(b"example.com"), 400, "not host:port"),
        (head(b"/"), 400, "not host:port"),
        (head(b"example.com:99999"), 400, "port"),
        (head(b"2001:db8::1:443"), 400, "brackets"),
        (head(b"bad_name!:443"), 400, "not host:port"),
        (head(host=False), 400, "Host"),
        (head(b"example.com:443", b"Content-Length: 5") + b"hello", 400, "no content"),
        (head(b"example.com:443", b"Transfer-Encoding: chunked"), 400, "no content"),
        (b"\x16\x03\x01\x02\x00\r\n\r\n", 400, "malformed"),
        (b"CONNECT example.com:443 HTTP/2.0\r\nHost: x\r\n\r\n", 400, "not HTTP/1.x"),
        (b"CONNECT example.com:443 HTTP/1.2\r\nHost: x\r\n\r\n", 400, "not HTTP/1.x"),
        (b"CONNECT  example.com:443 HTTP/1.1\r\n\r\n", 400, "malformed"),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost example.com\r\n\r\n", 400, "malformed"),
        (head(b"example.com:443", b"X: " + b"y" * MAX_HEAD_BYTES), 431, f"over {MAX_HEAD_BYTES} bytes"),
    ],
)
def test_refusals(data: bytes, status: int, match: str) -> None:
    with pytest.raises(HttpConnectError, match=match) as info:
        ConnectReader().feed(data)
    assert info.value.status == status
    response(info.value.status)  # every refusal has its response


def test_need_more_until_the_blank_line() -> None:
    data = head()
    reader = ConnectReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is None, i
    assert reader.feed(data[-1:]) == ConnectRequest("example.com", 443, None, b"")
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


def test_eof_before_any_request() -> None:
    assert outcome(b"", eof=True) == (400, "the client closed the connection before sending a request")


def test_eof_before_the_head_ends() -> None:
    reader = ConnectReader()
    assert reader.feed(b"CONNECT example.com:443 HTTP/1.1\r\n") is None
    with pytest.raises(HttpConnectError) as info:
        reader.feed(b"")
    assert info.value.status == 400


def test_head_bound_counts_a_slow_trickle_too() -> None:
    reader = ConnectReader(max_head_bytes=1024)
    reader.feed(b"CONNECT example.com:443 HTTP/1.1\r\n")
    with pytest.raises(HttpConnectError) as info:
        for _ in range(100):
            reader.feed(b"X-Pad: " + b"y" * 20 + b"\r\n")
    assert info.value.status == 431


def test_a_big_first_read_is_leftover_not_head() -> None:
    """The bound is on the head: a client may send its tunnel data right after it."""
    data = head() + b"z" * (4 * MAX_HEAD_BYTES)
    result = ConnectReader().feed(data)
    assert result is not None and result.leftover == b"z" * (4 * MAX_HEAD_BYTES)


# --- Responses -----------------------------------------------------------------------


def read_back(data: bytes) -> tuple[h11.Response, bytes]:
    """A client's reading of a response to its CONNECT: status, headers and body."""
    client = h11.Connection(our_role=h11.CLIENT)
    client.send(h11.Request(method="CONNECT", target="example.com:443", headers=[("Host", "example.com:443")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    first = client.next_event()
    assert isinstance(first, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif event is h11.PAUSED or isinstance(event, h11.EndOfMessage):
            return first, body
        else:
            raise AssertionError(event)


@pytest.mark.parametrize("status", [400, 403, 405, 407, 431, 502, 504])
def test_error_responses(status: int) -> None:
    data = response(status)
    reply, body = read_back(data)
    headers = dict(reply.headers)
    assert reply.status_code == status
    assert headers[b"connection"] == b"close"
    assert int(headers[b"content-length"]) == len(body) and body.startswith(str(status).encode())
    assert (headers.get(b"proxy-authenticate") == b'Basic realm="triofwd"') is (status == 407)
    assert (headers.get(b"allow") == b"CONNECT") is (status == 405)


@pytest.mark.parametrize("status", [200, 201, 301, 404, 500, 999])
def test_no_response_for_other_statuses(status: int) -> None:
    with pytest.raises(ValueError):
        response(status)


def test_established_is_what_h11_sends_for_a_connect() -> None:
    server = h11.Connection(our_role=h11.SERVER)
    server.receive_data(head())
    assert isinstance(server.next_event(), h11.Request)
    assert server.next_event() == h11.EndOfMessage()
    assert server.next_event() is h11.PAUSED
    assert server.send(h11.Response(status_code=200, headers=[], reason=b"Connection established")) == ESTABLISHED
    assert server.our_state is h11.SWITCHED_PROTOCOL


def test_established_opens_the_tunnel_for_the_client() -> None:
    reply, _ = read_back(ESTABLISHED + b"tunnel bytes")
    assert reply.status_code == 200
    assert b"connection" not in dict(reply.headers)  # no Connection: close, whatever the client's version


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("destination_denied", 403),
        ("auth_failed", 407),
        ("connect_timeout", 504),
        (Reason.CONNECT_TIMEOUT, 504),
        ("connect_refused", 502),
        ("target_unreachable", 502),
        ("dns_error", 502),
        ("internal_error", 502),
    ],
)
def test_status_for_reason(reason: str, status: int) -> None:
    assert status_for_reason(reason) == status
    response(status)


def test_status_words_are_the_contracts() -> None:
    assert set(_REASON_STATUSES) <= CONTRACT_WORDS


# --- Fuzzing -------------------------------------------------------------------------

targets = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?(\.[a-z]{2,6}){0,3}", fullmatch=True),
)
header_lines = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["User-Agent", "Proxy-Connection", "X-Thing"]), st.from_regex(r"[ -~]{0,30}", fullmatch=True).map(str.strip)).map(lambda kv: f"{kv[0]}: {kv[1]}".encode()),
        st.tuples(st.binary(max_size=20), st.binary(max_size=20)).map(lambda up: b"Proxy-Authorization: " + basic(*up)),
    ),
    max_size=4,
)


@st.composite
def valid_requests(draw: st.DrawFn) -> bytes:
    target = f"{draw(targets)}:{draw(st.integers(0, 65535))}".encode()
    return head(target, *draw(header_lines), version=draw(st.sampled_from([b"1.0", b"1.1"]))) + draw(st.binary(max_size=30))


@FAST
@given(valid_requests())
def test_valid_requests_are_read(data: bytes) -> None:
    result = ConnectReader().feed(data)
    assert isinstance(result, ConnectRequest) and data.endswith(result.leftover)


@FAST
@given(st.one_of(st.binary(max_size=400), st.binary(max_size=300).map(lambda b: b"CONNECT " + b), valid_requests().map(lambda b: b[: len(b) // 2])))
def test_arbitrary_bytes_raise_only_http_connect_error(data: bytes) -> None:
    result = outcome(data)
    if isinstance(result, tuple):
        assert result[0] in (400, 405, 431)
    result = outcome(data, eof=True)  # and the client then closes
    assert result is None or isinstance(result, ConnectRequest | tuple)


@FAST
@given(valid_requests(), st.data())
def test_mutated_requests_raise_only_http_connect_error(data: bytes, draw: st.DataObject) -> None:
    mutated = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        mutated[draw.draw(st.integers(0, len(data) - 1))] = draw.draw(st.sampled_from(b"\r\n :[]/\x00\xff\tA0"))
    outcome(bytes(mutated))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@FAST
@given(st.one_of(valid_requests(), st.binary(max_size=200)), st.lists(st.integers(0, 10_000), max_size=10), st.booleans())
def test_any_chunking_gives_the_same_answer(data: bytes, cuts: list[int], eof: bool) -> None:
    assert outcome(chunked(data, cuts), eof=eof) == outcome(data, eof=eof)


@pytest.mark.parametrize("size", [MAX_HEAD_BYTES - 200, MAX_HEAD_BYTES - 1, MAX_HEAD_BYTES, MAX_HEAD_BYTES + 1, MAX_HEAD_BYTES + 500])
@pytest.mark.parametrize("step", [1, 7, 1000, 10**6])
def test_head_bound_whatever_the_reads(size: int, step: int) -> None:
    """A head of ``size`` bytes is read or refused alike, in one read or in many."""
    start = head(b"example.com:443")[:-2]
    data = start + b"X: " + b"y" * (size - len(start) - 7) + b"\r\n\r\n" + b"tail"
    assert len(data) == size + 4
    result = outcome([data[i : i + step] for i in range(0, len(data), step)])
    if size <= MAX_HEAD_BYTES:
        assert isinstance(result, ConnectRequest) and result.leftover == b"tail"
    else:
        assert result == (431, f"request head over {MAX_HEAD_BYTES} bytes")
