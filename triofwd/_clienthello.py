"""Pure parser for a TLS ClientHello: enough to route by SNI and ALPN.

Bytes in, result out: no I/O and no trio. The caller keeps appending what it
reads from the client to one buffer and calls :func:`parse_client_hello` on the
whole buffer again; ``None`` means "a valid prefix so far, read more".

References: RFC 8446 (TLS 1.3) sections 4.1.2, 4.2 and 5.1; RFC 5246 (TLS 1.2)
sections 6.2.1 and 7.4.1.2; RFC 6066 section 3 (server_name); RFC 7301
section 3.1 (ALPN).
"""

from __future__ import annotations

from dataclasses import dataclass

# --- Record layer (RFC 8446 §5.1, RFC 5246 §6.2.1) ---------------------------

#: ContentType.handshake: every record up to the end of the ClientHello has it.
CONTENT_TYPE_HANDSHAKE = 22
RECORD_HEADER_BYTES = 5
#: TLSPlaintext.length MUST NOT exceed 2^14.
MAX_RECORD_PAYLOAD = 2**14
#: Record-layer versions we accept: SSL 3.0 (0x0300) up to 0x0304. Leniency on
#: purpose: TLS 1.3 clients put 0x0301 in the first record, and the record
#: version is not what the version negotiation uses anyway.
RECORD_VERSION_MAJOR = 3
MAX_RECORD_VERSION_MINOR = 4

# --- Handshake layer (RFC 8446 §4) -------------------------------------------

HANDSHAKE_HEADER_BYTES = 4
HANDSHAKE_TYPE_CLIENT_HELLO = 1
#: Our own bound on the bytes (record headers included) a ClientHello may span.
#: Real hellos are well under 2 KiB, post-quantum key shares bring them to a
#: few KiB; 64 KiB is generous while keeping a peeking forwarder's buffer small.
MAX_HELLO_BYTES = 64 * 1024

RANDOM_BYTES = 32
MAX_SESSION_ID_BYTES = 32

# --- Extensions --------------------------------------------------------------

EXT_SERVER_NAME = 0  # RFC 6066 §3
EXT_ALPN = 16  # RFC 7301 §3.1
EXT_SUPPORTED_VERSIONS = 43  # RFC 8446 §4.2.1
#: NameType.host_name (RFC 6066 §3).
SNI_HOST_NAME = 0
#: DNS limits (RFC 1035 §2.3.4) for the text form without a trailing dot.
MAX_HOST_NAME_CHARS = 253
MAX_LABEL_CHARS = 63
_HOST_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


class ClientHelloError(ValueError):
    """The bytes are not, and can never become, a TLS ClientHello."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a forwarder needs from a complete ClientHello."""

    #: The SNI host_name, lower-cased ASCII without a trailing dot (IDNA
    #: A-labels such as ``xn--...`` are kept as sent); None without SNI.
    server_name: str | None
    #: ALPN protocol names in client preference order. Decoded as Latin-1 so
    #: that any byte string (including RFC 8701 GREASE values) maps to a str
    #: losslessly; ``name.encode("latin-1")`` gives the wire bytes back.
    alpn: tuple[str, ...]
    #: ClientHello.legacy_version, e.g. 0x0303.
    legacy_version: int
    #: The supported_versions extension, GREASE values included; () if absent.
    supported_versions: tuple[int, ...]
    #: How many bytes at the start of the buffer the hello occupied: every
    #: record up to and including the one that completed it.
    record_bytes: int


def looks_like_tls(first_byte: int) -> bool:
    """Whether a connection's first byte can start a TLS ClientHello record."""
    return first_byte == CONTENT_TYPE_HANDSHAKE


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse a ClientHello from the start of ``data``.

    Returns the :class:`ClientHello` once complete, or None if ``data`` is a
    valid prefix and more bytes are needed. Raises :class:`ClientHelloError`
    (and nothing else) if ``data`` can never start a ClientHello.

    The hello may be split over several handshake records and the records over
    several reads. Bytes after the record that completes the hello are not
    looked at (see :attr:`ClientHello.record_bytes`).
    """
    # Nothing valid extends past MAX_HELLO_BYTES, so trimming loses nothing and
    # bounds the work whatever the caller has buffered.
    buf = bytes(data[:MAX_HELLO_BYTES])
    handshake = bytearray()
    offset = 0
    while True:
        header = buf[offset : offset + RECORD_HEADER_BYTES]
        _check_record_header(header)
        if len(header) < RECORD_HEADER_BYTES:
            return None
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            # RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent.
            raise ClientHelloError("empty handshake record")
        if length > MAX_RECORD_PAYLOAD:
            raise ClientHelloError(f"record length {length} exceeds 2^14")
        end = offset + RECORD_HEADER_BYTES + length
        if end > MAX_HELLO_BYTES:
            raise ClientHelloError(f"ClientHello exceeds {MAX_HELLO_BYTES} bytes")
        fragment = buf[offset + RECORD_HEADER_BYTES : end]
        handshake += fragment
        # Checked before the record is complete, so that a wrong message type
        # or an impossible length is refused without waiting for more bytes.
        message_length = _handshake_length(handshake)
        if message_length is not None:
            held_after_record = len(handshake) + length - len(fragment)
            missing = HANDSHAKE_HEADER_BYTES + message_length - held_after_record
            # Whatever is missing needs at least one more record.
            if missing > 0 and end + RECORD_HEADER_BYTES + missing > MAX_HELLO_BYTES:
                raise ClientHelloError(f"ClientHello exceeds {MAX_HELLO_BYTES} bytes")
        if len(fragment) < length:
            return None  # the record itself is still arriving
        offset = end
        if message_length is None:
            continue
        total = HANDSHAKE_HEADER_BYTES + message_length
        if len(handshake) < total:
            continue
        if len(handshake) > total:
            # The client's first flight holds nothing after the ClientHello,
            # so extra handshake bytes in the same record mean garbage.
            raise ClientHelloError("trailing bytes after the ClientHello")
        return _parse_body(bytes(handshake[HANDSHAKE_HEADER_BYTES:]), offset)


def _check_record_header(header: bytes) -> None:
    """Reject a (possibly partial) record header that is not TLS handshake."""
    if len(header) >= 1 and header[0] != CONTENT_TYPE_HANDSHAKE:
        # Also covers alerts/ChangeCipherSpec interleaved mid-hello, which
        # RFC 8446 §5.1 forbids, and SSLv2-style hellos, which carry no SNI.
        raise ClientHelloError(f"not a TLS handshake record (content type {header[0]})")
    if len(header) >= 2 and header[1] != RECORD_VERSION_MAJOR:
        raise ClientHelloError("bad record-layer version")
    if len(header) >= 3 and header[2] > MAX_RECORD_VERSION_MINOR:
        raise ClientHelloError("bad record-layer version")


def _handshake_length(handshake: bytearray) -> int | None:
    """Check the handshake type; return the message length once it is known."""
    if len(handshake) < 1:
        return None
    if handshake[0] != HANDSHAKE_TYPE_CLIENT_HELLO:
        raise ClientHelloError(f"handshake type {handshake[0]} is not ClientHello")
    if len(handshake) < HANDSHAKE_HEADER_BYTES:
        return None
    return int.from_bytes(handshake[1:4], "big")


class _Reader:
    """A cursor over a fully received structure; running short is an error.

    The body's length is known before parsing starts, so any truncation inside
    it is malformed input, never "need more bytes".
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes) -> None:
        self._buf = buf
        self._pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self._buf) - self._pos:
            raise ClientHelloError(f"truncated {what}")
        chunk = self._buf[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, length_bytes: int, what: str, minimum: int = 0) -> _Reader:
        """Read a TLS variable-length vector <minimum..2^(8*length_bytes)-1>."""
        length = self.uint(length_bytes, what)
        if length < minimum:
            raise ClientHelloError(f"{what} shorter than {minimum} bytes")
        return _Reader(self.take(length, what))

    @property
    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def expect_end(self, what: str) -> None:
        if self.remaining:
            raise ClientHelloError(f"trailing bytes in {what}")


def _parse_body(body: bytes, record_bytes: int) -> ClientHello:
    """Parse the ClientHello structure of RFC 8446 §4.1.2 / RFC 5246 §7.4.1.2."""
    r = _Reader(body)
    legacy_version = r.uint(2, "legacy_version")
    if legacy_version >> 8 != RECORD_VERSION_MAJOR:
        raise ClientHelloError(f"bad legacy_version 0x{legacy_version:04x}")
    r.take(RANDOM_BYTES, "random")
    if r.vector(1, "legacy_session_id").remaining > MAX_SESSION_ID_BYTES:
        raise ClientHelloError("legacy_session_id longer than 32 bytes")
    suites = r.vector(2, "cipher_suites", minimum=2)
    if suites.remaining % 2:
        raise ClientHelloError("odd cipher_suites length")
    r.vector(1, "legacy_compression_methods", minimum=1)

    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    supported_versions: tuple[int, ...] = ()
    # RFC 5246 §7.4.1.2: a hello may end right after compression_methods.
    if r.remaining:
        extensions = r.vector(2, "extensions")
        r.expect_end("ClientHello")
        seen: set[int] = set()
        while extensions.remaining:
            ext_type = extensions.uint(2, "extension type")
            ext = extensions.vector(2, "extension data")
            if ext_type in seen:
                # RFC 8446 §4.2: no more than one extension of the same type.
                raise ClientHelloError(f"duplicate extension {ext_type}")
            seen.add(ext_type)
            if ext_type == EXT_SERVER_NAME:
                server_name = _parse_server_name(ext)
            elif ext_type == EXT_ALPN:
                alpn = _parse_alpn(ext)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                supported_versions = _parse_supported_versions(ext)
    return ClientHello(
        server_name=server_name,
        alpn=alpn,
        legacy_version=legacy_version,
        supported_versions=supported_versions,
        record_bytes=record_bytes,
    )


def _parse_server_name(ext: _Reader) -> str | None:
    """RFC 6066 §3: ServerNameList server_name_list<1..2^16-1>."""
    names = ext.vector(2, "server_name_list", minimum=1)
    ext.expect_end("server_name extension")
    host_name: str | None = None
    while names.remaining:
        name_type = names.uint(1, "server name type")
        # Only host_name is defined; other types are assumed to share its
        # 2-byte-length layout so they can be skipped rather than refused.
        name = names.vector(2, "server name", minimum=1)
        if name_type != SNI_HOST_NAME:
            continue
        if host_name is not None:
            raise ClientHelloError("more than one host_name in server_name")
        host_name = _host_name(name.take(name.remaining, "host_name"))
    return host_name


def _host_name(raw: bytes) -> str:
    """Validate and normalise a HostName: ASCII DNS name, lower-cased.

    Strict on purpose: the result is used as a routing key and in logs, so
    anything that is not a plain DNS name (NUL, '/', spaces, UTF-8) is refused.
    """
    if not raw.isascii():
        raise ClientHelloError("host_name is not ASCII")
    name = raw.decode("ascii").lower()
    # RFC 6066 says "without a trailing dot", but some clients send one; it
    # names the same host, so drop it instead of failing the connection.
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_HOST_NAME_CHARS:
        raise ClientHelloError("host_name has a bad length")
    for label in name.split("."):
        if not 0 < len(label) <= MAX_LABEL_CHARS or not _HOST_NAME_CHARS.issuperset(label):
            raise ClientHelloError(f"host_name {name!r} is not a DNS name")
    return name


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    """RFC 7301 §3.1: ProtocolNameList protocol_name_list<2..2^16-1>."""
    names = ext.vector(2, "protocol_name_list", minimum=2)
    ext.expect_end("ALPN extension")
    protocols: list[str] = []
    while names.remaining:
        name = names.vector(1, "protocol name", minimum=1)
        protocols.append(name.take(name.remaining, "protocol name").decode("latin-1"))
    return tuple(protocols)


def _parse_supported_versions(ext: _Reader) -> tuple[int, ...]:
    """RFC 8446 §4.2.1: ProtocolVersion versions<2..254> in a ClientHello."""
    versions = ext.vector(1, "supported_versions", minimum=2)
    ext.expect_end("supported_versions extension")
    if versions.remaining % 2:
        raise ClientHelloError("odd supported_versions length")
    return tuple(versions.uint(2, "version") for _ in range(versions.remaining // 2))
