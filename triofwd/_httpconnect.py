"""Pure reader for an HTTP CONNECT request, and the responses an HTTP proxy gives.

Bytes in, result out: no I/O and no trio. HTTP is parsed by h11, not by hand. The caller
feeds what it reads to one :class:`ConnectReader` until it returns a
:class:`ConnectRequest`; :class:`HttpConnectError` (and nothing else) is raised for a
request this proxy will not serve, carrying the status to answer with
(:func:`response`). The request head is bounded by :data:`MAX_HEAD_BYTES` (431 beyond).

Then: 407 (:func:`response`) when the route has users and the credentials do not match,
403 for a destination the allow-list refuses, 502 or 504 when the dial fails, and
:data:`ESTABLISHED` once the target is connected, after which the bytes are relayed
(:attr:`ConnectRequest.leftover` first).
"""

from __future__ import annotations

import base64
import binascii
import http
from collections.abc import Iterable
from dataclasses import dataclass

import h11

from ._destinations import parse_authority

__all__ = ["ESTABLISHED", "MAX_HEAD_BYTES", "ConnectReader", "ConnectRequest", "HttpConnectError", "response", "status_for_reason"]

#: The longest request head (request line and headers) read before answering 431;
#: h11's default, far above what CONNECT clients send.
MAX_HEAD_BYTES = 16 * 1024
REALM = "triofwd"

#: The answer to a CONNECT whose tunnel is open. Written out rather than made by h11:
#: for an HTTP/1.0 client h11 would add "Connection: close", which is wrong for a tunnel
#: (RFC 9110 §9.3.6: after a 2xx the connection is the tunnel, and the response carries
#: no framing headers). For an HTTP/1.1 request these are exactly h11's bytes (tested).
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

#: Bodies of the error responses, for a human reading them in a browser or curl -v.
_MESSAGES: dict[int, str] = {
    400: "malformed CONNECT request",
    403: "destination not allowed",
    405: "this proxy only tunnels: use CONNECT host:port",
    407: "this proxy needs a user name and password (Basic)",
    431: "request head too large",
    502: "could not connect to the destination",
    504: "timed out connecting to the destination",
}
#: Reason words (CONTRACT.md) with a status of their own; any other failure is a 502.
_REASON_STATUSES: dict[str, int] = {
    "destination_denied": 403,
    "rejected": 403,
    "ip_blocked": 403,
    "auth_failed": 407,
    "connect_timeout": 504,
}


class HttpConnectError(ValueError):
    """The request is not one this proxy serves."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        #: The status to answer with (400, 405 or 431) before closing.
        self.status = status


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A complete CONNECT request head."""

    #: A DNS name lower-cased without its trailing dot, or an IP address (IPv6 without
    #: brackets) in canonical text form.
    host: str
    port: int
    #: (user-id, password) from ``Proxy-Authorization: Basic``, as sent (RFC 7617 leaves
    #: the character set to the client; UTF-8 in practice); None when there is no such
    #: header, or it is not Basic or not valid base64 "user:password".
    credentials: tuple[bytes, bytes] | None
    #: What the client sent after the head: the start of the tunnel's data.
    leftover: bytes


class ConnectReader:
    """Reads one CONNECT request head, with h11."""

    def __init__(self, *, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self._conn = h11.Connection(our_role=h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self._max_head_bytes = max_head_bytes
        self._fed = 0
        self._target: tuple[str, int] | None = None
        self._credentials: tuple[bytes, bytes] | None = None
        self._finished = False
        # A read that ends between a line's CR and its LF: the CR waits for the next read, so
        # that h11 always sees a line end whole (its answer to b"\r" then b"\n" differs from
        # its answer to b"\r\n": what the client sent, not how it was split, decides).
        self._held = b""

    def feed(self, data: bytes) -> ConnectRequest | None:
        """Add bytes read from the client (``b""``: it closed). The request once the head
        is complete, None while more is needed; raises :class:`HttpConnectError`."""
        if self._finished:
            raise RuntimeError("feed() after the request was read or refused")
        self._fed += len(data)
        try:
            if not data:  # the client closed: what was held goes first
                if self._held:
                    self._conn.receive_data(self._held)
                    self._held = b""
                self._conn.receive_data(b"")
            else:
                data, self._held = self._held + data, b""
                if data.endswith(b"\r"):
                    data, self._held = data[:-1], b"\r"
                if data:
                    self._conn.receive_data(data)
            return self._next()
        except h11.RemoteProtocolError as exc:
            self._finished = True
            # h11's hint: 400, or 431 for a head over the bound.
            if exc.error_status_hint == 431:
                raise HttpConnectError(431, self._too_long) from None
            raise HttpConnectError(exc.error_status_hint, f"malformed request: {exc}") from None
        except HttpConnectError:
            self._finished = True
            raise

    def _next(self) -> ConnectRequest | None:
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Request):
                self._read_head(event)
            elif isinstance(event, h11.EndOfMessage):
                continue
            elif event is h11.PAUSED:
                # h11 stops at a CONNECT's end, waiting for our answer to its proposed
                # protocol switch; what it holds after the head is the tunnel's.
                assert self._target is not None
                self._finished = True
                leftover, _closed = self._conn.trailing_data
                leftover, self._held = leftover + self._held, b""  # a CR held back is the tunnel's too
                # h11 bounds a head it is still waiting for; one that arrived whole in a
                # single read is bounded here.
                if self._fed - len(leftover) > self._max_head_bytes:
                    raise HttpConnectError(431, self._too_long)
                return ConnectRequest(host=self._target[0], port=self._target[1], credentials=self._credentials, leftover=leftover)
            else:  # ConnectionClosed (a body, Data, is refused with the head)
                raise HttpConnectError(400, "the client closed the connection before sending a request")

    def _read_head(self, request: h11.Request) -> None:
        method = request.method.decode("ascii", "replace")
        if request.http_version not in (b"1.0", b"1.1"):
            # h11 reads any "HTTP/x.y" line; HTTP/2 and later are not text.
            raise HttpConnectError(400, f"HTTP/{request.http_version.decode('ascii', 'replace')} is not HTTP/1.x")
        if request.method != b"CONNECT":
            raise HttpConnectError(405, f"method {method!r} is not supported: only CONNECT")
        # RFC 9110 §9.3.6: a CONNECT request has no content. Refused rather than read,
        # since a body would be taken for the start of the tunnel.
        for name, value in request.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
                raise HttpConnectError(400, "a CONNECT request has no content")
        target = request.target.decode("ascii", "replace")
        try:
            self._target = parse_authority(target)
        except ValueError as exc:
            raise HttpConnectError(400, f"CONNECT target is not host:port: {exc}") from None
        self._credentials = _basic_credentials(request.headers)

    @property
    def _too_long(self) -> str:
        return f"request head over {self._max_head_bytes} bytes"


def _basic_credentials(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, bytes] | None:
    """RFC 7617 credentials from the first Proxy-Authorization header, if Basic."""
    for name, value in headers:
        if name != b"proxy-authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except binascii.Error:
            return None
        user, colon, password = decoded.partition(b":")
        return (user, password) if colon else None
    return None


def response(status: int) -> bytes:
    """The whole response for a refusal or failure (400, 403, 405, 407, 431, 502, 504),
    made by h11: a short text body, ``Connection: close``, and ``Proxy-Authenticate:
    Basic realm="triofwd"`` on a 407, ``Allow: CONNECT`` on a 405."""
    message = _MESSAGES.get(status)
    if message is None:
        raise ValueError(f"no response for status {status}: expected one of {sorted(_MESSAGES)}")
    body = f"{status} {http.HTTPStatus(status).phrase}: {message}\n".encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), ("Connection", "close")]
    if status == 407:
        headers.append(("Proxy-Authenticate", f'Basic realm="{REALM}"'))
    elif status == 405:
        headers.append(("Allow", "CONNECT"))
    # A fresh server connection may answer from its idle state: that is how h11 lets a
    # server answer a request it could not parse.
    conn = h11.Connection(our_role=h11.SERVER)
    head = conn.send(h11.Response(status_code=status, headers=headers, reason=http.HTTPStatus(status).phrase))
    return head + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())


def status_for_reason(reason: str) -> int:
    """The status for why a CONNECT failed, given as the project's reason word: 403 for a
    refused destination, 407 for failed authentication, 504 for a connect timeout, 502
    for every other failure to reach the target."""
    return _REASON_STATUSES.get(str(reason), 502)
