"""Pure codec for the server side of a SOCKS5 handshake (RFC 1928, RFC 1929).

Bytes in, events out: no I/O and no trio, in the manner of h11. A
:class:`Socks5Server` is fed what the client sends (:meth:`~Socks5Server.receive_data`)
and asked for the next event (:meth:`~Socks5Server.next_event`) until it answers
:data:`NEED_DATA`; the server answers each event with the bytes the matching method
returns::

    Greeting(methods)            -> select_method(choose_method(...)) -> 2 bytes
    UsernamePassword(user, pw)   -> auth_result(ok)                   -> 2 bytes
    ConnectRequest(host, port)   -> encode_reply(REP_..., bound)      -> then relay .leftover
    UnsupportedCommand(...)      -> encode_reply(REP_COMMAND_NOT_SUPPORTED), close

Input is bounded: :meth:`~Socks5Server.receive_data` may only be called after
:data:`NEED_DATA`, which comes only while the message being read is incomplete, so no
more than one message's maximum (:data:`MAX_AUTH_BYTES` at most) plus one read is ever
buffered. A client may send its next messages, and even its first application bytes,
before it has our answer; they wait in the buffer, and what follows the request is
:attr:`~Socks5Server.leftover`, the initial data of the forward path.

Anything that is not, and can never become, a valid handshake raises
:class:`Socks5Error` (and nothing else does), with the reply code to send first, if the
protocol has one for it.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
from dataclasses import dataclass

from ._destinations import normalize_host

__all__ = [
    "NEED_DATA",
    "ConnectRequest",
    "Event",
    "Greeting",
    "NeedData",
    "Socks5Error",
    "Socks5Server",
    "UnsupportedCommand",
    "UsernamePassword",
    "choose_method",
    "encode_auth_status",
    "encode_method_selection",
    "encode_reply",
    "reply_for_errno",
    "reply_for_reason",
]

VERSION = 0x05

# --- Methods (RFC 1928 §3) ---------------------------------------------------------

METHOD_NO_AUTH = 0x00
METHOD_GSSAPI = 0x01
METHOD_USERNAME_PASSWORD = 0x02
METHOD_NO_ACCEPTABLE = 0xFF

# --- Username/password sub-negotiation (RFC 1929 §2) -------------------------------

AUTH_VERSION = 0x01
AUTH_SUCCESS = 0x00
#: Any other status is a failure; the server closes the connection after it.
AUTH_FAILURE = 0x01

# --- Requests (RFC 1928 §4, §5) ----------------------------------------------------

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

# --- Replies (RFC 1928 §6) ---------------------------------------------------------

REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

# --- Bounds: the longest each message can be ---------------------------------------

#: VER, NMETHODS, up to 255 METHODS.
MAX_GREETING_BYTES = 2 + 255
#: VER, ULEN, UNAME (255), PLEN, PASSWD (255).
MAX_AUTH_BYTES = 3 + 255 + 255
#: VER, CMD, RSV, ATYP, a domain name (length byte and 255), DST.PORT.
MAX_REQUEST_BYTES = 4 + 1 + 255 + 2

#: The project's reason words (CONTRACT.md) with a reply code of their own; any other
#: reason is a general failure. An unreachable network (0x03) has no word of its own: a
#: dial that knows the errno asks :func:`reply_for_errno`.
_REASON_REPLIES: dict[str, int] = {
    "connect_refused": REP_CONNECTION_REFUSED,
    "connect_timeout": REP_TTL_EXPIRED,  # curl, Dante and most clients read 0x06 as a timeout
    "target_unreachable": REP_HOST_UNREACHABLE,
    "dns_error": REP_HOST_UNREACHABLE,
    "destination_denied": REP_NOT_ALLOWED,
    "auth_failed": REP_NOT_ALLOWED,
    "rejected": REP_NOT_ALLOWED,
    "ip_blocked": REP_NOT_ALLOWED,
}
_ERRNO_REPLIES: dict[int, int] = {
    errno.ENETUNREACH: REP_NETWORK_UNREACHABLE,
    errno.ENETDOWN: REP_NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: REP_HOST_UNREACHABLE,
    errno.EHOSTDOWN: REP_HOST_UNREACHABLE,
    errno.ECONNREFUSED: REP_CONNECTION_REFUSED,
    errno.ETIMEDOUT: REP_TTL_EXPIRED,
}


class Socks5Error(ValueError):
    """The bytes are not, and can never become, a valid SOCKS5 handshake."""

    def __init__(self, message: str, reply: int | None = None) -> None:
        super().__init__(message)
        #: The REP code to send (:func:`encode_reply`) before closing, when the failure
        #: is in a request and RFC 1928 has a code for it; None: just close.
        self.reply = reply


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA`."""

    NEED_DATA = enum.auto()


#: :meth:`Socks5Server.next_event`'s answer while the message being read is incomplete.
NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Greeting:
    """The client's version identifier/method selection message."""

    #: The methods the client offers, in its order.
    methods: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UsernamePassword:
    """RFC 1929 credentials, as sent (bytes: RFC 1929 names no character set)."""

    username: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A CONNECT request: the destination the client asks for."""

    #: For ATYP_DOMAIN the name lower-cased, without a trailing dot (an IP literal sent
    #: as a name is given as that address); otherwise the IP in canonical text form.
    host: str
    port: int
    #: ATYP_IPV4, ATYP_DOMAIN or ATYP_IPV6, as sent.
    address_type: int


@dataclass(frozen=True, slots=True)
class UnsupportedCommand:
    """A well-formed request with a command other than CONNECT (BIND, UDP ASSOCIATE or an
    unknown one): answer REP_COMMAND_NOT_SUPPORTED and close."""

    command: int
    host: str
    port: int
    address_type: int


Event = Greeting | UsernamePassword | ConnectRequest | UnsupportedCommand


class _Stage(enum.Enum):
    GREETING = "reading the greeting"
    METHOD = "waiting for select_method()"
    AUTH = "reading the username/password"
    AUTH_RESULT = "waiting for auth_result()"
    REQUEST = "reading the request"
    DONE = "done"
    CLOSED = "closed"


class Socks5Server:
    """The server side of one SOCKS5 handshake."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._stage = _Stage.GREETING
        self._methods: tuple[int, ...] = ()
        # receive_data() is only for a codec that has just said NEED_DATA: that is what
        # bounds the buffer.
        self._wants_data = True

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the client. Only after :meth:`next_event` answered
        :data:`NEED_DATA` (and before the first call). An EOF is the caller's to act on
        (the client went away mid-handshake): the codec has nothing to say about it."""
        if not self._wants_data:
            raise RuntimeError(f"receive_data() while {self._stage.value}: call next_event() until it answers NEED_DATA")
        self._wants_data = False
        self._buffer += data

    def next_event(self) -> Event | NeedData:
        """The next complete message, or :data:`NEED_DATA`. Raises :class:`Socks5Error`
        for bytes that can never become a valid handshake."""
        parsers = {_Stage.GREETING: _parse_greeting, _Stage.AUTH: _parse_auth, _Stage.REQUEST: _parse_request}
        parse = parsers.get(self._stage)
        if parse is None:
            raise RuntimeError(f"next_event() while {self._stage.value}")
        try:
            parsed = parse(bytes(self._buffer))
        except Socks5Error:
            self._stage = _Stage.CLOSED
            raise
        if parsed is None:
            self._wants_data = True
            return NEED_DATA
        event, consumed = parsed
        del self._buffer[:consumed]
        if isinstance(event, Greeting):
            self._methods = event.methods
            self._stage = _Stage.METHOD
        elif isinstance(event, UsernamePassword):
            self._stage = _Stage.AUTH_RESULT
        else:
            self._stage = _Stage.DONE
        return event

    def select_method(self, method: int) -> bytes:
        """Answer the :class:`Greeting`: METHOD_NO_AUTH or METHOD_USERNAME_PASSWORD (one
        the client offered), or METHOD_NO_ACCEPTABLE, after which the connection closes.
        Returns the bytes to send."""
        if self._stage is not _Stage.METHOD:
            raise RuntimeError(f"select_method() while {self._stage.value}")
        if method == METHOD_NO_ACCEPTABLE:
            self._stage = _Stage.CLOSED
        elif method not in self._methods:
            raise ValueError(f"method 0x{method:02x} was not offered by the client")
        elif method == METHOD_NO_AUTH:
            self._stage = _Stage.REQUEST
        elif method == METHOD_USERNAME_PASSWORD:
            self._stage = _Stage.AUTH
        else:
            raise ValueError(f"method 0x{method:02x} is not supported")
        return encode_method_selection(method)

    def auth_result(self, ok: bool) -> bytes:
        """Answer the :class:`UsernamePassword`; after a failure the connection closes
        (RFC 1929 §2). Returns the bytes to send."""
        if self._stage is not _Stage.AUTH_RESULT:
            raise RuntimeError(f"auth_result() while {self._stage.value}")
        self._stage = _Stage.REQUEST if ok else _Stage.CLOSED
        return encode_auth_status(ok)

    @property
    def leftover(self) -> bytes:
        """After the request: the bytes the client sent after it, which belong to the
        forward path (initial data)."""
        if self._stage is not _Stage.DONE:
            raise RuntimeError(f"leftover while {self._stage.value}")
        return bytes(self._buffer)


def choose_method(methods: tuple[int, ...], *, auth_required: bool) -> int:
    """The method to select among those offered: username/password when the route has
    users, no authentication otherwise, or METHOD_NO_ACCEPTABLE."""
    wanted = METHOD_USERNAME_PASSWORD if auth_required else METHOD_NO_AUTH
    return wanted if wanted in methods else METHOD_NO_ACCEPTABLE


# --- Parsing -----------------------------------------------------------------------


def _check_version(data: bytes) -> None:
    if data and data[0] != VERSION:
        hint = " (SOCKS4 is not supported)" if data[0] == 4 else ""
        raise Socks5Error(f"not SOCKS5: version byte 0x{data[0]:02x}{hint}")


def _parse_greeting(data: bytes) -> tuple[Greeting, int] | None:
    """RFC 1928 §3: VER, NMETHODS, METHODS."""
    _check_version(data)
    if len(data) < 2:
        return None
    end = 2 + data[1]
    if len(data) < end:
        return None
    return Greeting(methods=tuple(data[2:end])), end


def _parse_auth(data: bytes) -> tuple[UsernamePassword, int] | None:
    """RFC 1929 §2: VER (1), ULEN, UNAME, PLEN, PASSWD."""
    if data and data[0] != AUTH_VERSION:
        raise Socks5Error(f"username/password sub-negotiation version 0x{data[0]:02x}, expected 0x01 (RFC 1929)")
    if len(data) < 2:
        return None
    user_end = 2 + data[1]
    if len(data) < user_end + 1:
        return None
    end = user_end + 1 + data[user_end]
    if len(data) < end:
        return None
    return UsernamePassword(username=data[2:user_end], password=data[user_end + 1 : end]), end


def _parse_request(data: bytes) -> tuple[ConnectRequest | UnsupportedCommand, int] | None:
    """RFC 1928 §4: VER, CMD, RSV, ATYP, DST.ADDR, DST.PORT."""
    if data and data[0] != VERSION:
        raise Socks5Error(f"request version 0x{data[0]:02x}, expected 0x05")
    if len(data) < 4:
        return None
    # RSV (data[2]) "must be" zero; it carries nothing, so it is not checked, as other
    # servers do not check it either.
    command, atyp = data[1], data[3]
    if atyp == ATYP_IPV4:
        end = 4 + 4
    elif atyp == ATYP_IPV6:
        end = 4 + 16
    elif atyp == ATYP_DOMAIN:
        if len(data) < 5:
            return None
        if data[4] == 0:
            raise Socks5Error("empty domain name", reply=REP_HOST_UNREACHABLE)
        end = 5 + data[4]
    else:
        raise Socks5Error(f"address type 0x{atyp:02x} is not supported", reply=REP_ADDRESS_TYPE_NOT_SUPPORTED)
    if len(data) < end + 2:
        return None
    if atyp == ATYP_DOMAIN:
        host = _domain(data[5:end])
    else:
        host = str(ipaddress.ip_address(data[4:end]))
    port = int.from_bytes(data[end : end + 2], "big")
    if command == CMD_CONNECT:
        return ConnectRequest(host=host, port=port, address_type=atyp), end + 2
    return UnsupportedCommand(command=command, host=host, port=port, address_type=atyp), end + 2


def _domain(raw: bytes) -> str:
    # Strict on purpose: the name is matched against the allow-list, resolved and
    # logged, so anything that is not a plain DNS name (or an address) is refused. It
    # can never resolve, hence "host unreachable".
    try:
        return normalize_host(raw.decode("ascii"))
    except ValueError:  # UnicodeDecodeError is a ValueError too
        raise Socks5Error(f"domain name {raw!r} is not a host name", reply=REP_HOST_UNREACHABLE) from None


# --- Encoding ----------------------------------------------------------------------


def encode_method_selection(method: int) -> bytes:
    """The server's method selection message (RFC 1928 §3)."""
    return bytes((VERSION, _byte(method, "method")))


def encode_auth_status(ok: bool) -> bytes:
    """The RFC 1929 status message: success, or failure (then close)."""
    return bytes((AUTH_VERSION, AUTH_SUCCESS if ok else AUTH_FAILURE))


def encode_reply(rep: int, bound: tuple[str, int] | None = None) -> bytes:
    """A reply (RFC 1928 §6): the REP code and the bound address, an IP with its port
    (the local end of the connection to the target); 0.0.0.0:0 when there is none, as
    in a failure."""
    host, port = bound if bound is not None else ("0.0.0.0", 0)
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        raise ValueError(f"bound address {host!r} is not an IP address") from None
    if type(port) is not int or not 0 <= port <= 0xFFFF:
        raise ValueError(f"invalid bound port {port!r}")
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((VERSION, _byte(rep, "reply code"), 0x00, atyp)) + ip.packed + port.to_bytes(2, "big")


def _byte(value: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= 0xFF:
        raise ValueError(f"{what} {value!r} is not a byte")
    return value


def reply_for_reason(reason: str) -> int:
    """The REP code for why a CONNECT failed, given as the project's reason word."""
    return _REASON_REPLIES.get(str(reason), REP_GENERAL_FAILURE)


def reply_for_errno(code: int | None) -> int:
    """The REP code for a failed connect's errno (ENETUNREACH: network unreachable,
    EHOSTUNREACH: host unreachable, ECONNREFUSED: refused, ETIMEDOUT: timeout)."""
    return _ERRNO_REPLIES.get(code, REP_GENERAL_FAILURE) if code is not None else REP_GENERAL_FAILURE
