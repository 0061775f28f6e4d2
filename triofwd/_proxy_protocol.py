"""Pure codec for the PROXY protocol, versions 1 and 2.

Bytes in, result out: no I/O and no trio. Reference: HAProxy's
doc/proxy-protocol.txt ("the spec" below); section numbers refer to it.

The caller keeps appending what it reads to one buffer and calls
:func:`parse_proxy_header` on the whole buffer again; ``None`` means "a valid
prefix so far, read more".
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ._addresses import IPAddress

# --- Version 1, text (§2.1) --------------------------------------------------

V1_PREFIX = b"PROXY "
CRLF = b"\r\n"
#: Longest valid line, CRLF included ("PROXY UNKNOWN" with two full IPv6
#: addresses and ports); no CRLF within this many bytes means invalid.
V1_MAX_LINE = 107
V1_TCP4 = "TCP4"
V1_TCP6 = "TCP6"
V1_UNKNOWN = "UNKNOWN"
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")

# --- Version 2, binary (§2.2) ------------------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version/command byte, family/transport byte, 2-byte length.
V2_HEADER_BYTES = 16
V2_VERSION = 0x2
V2_CMD_LOCAL = 0x0
V2_CMD_PROXY = 0x1
#: Address families (high nibble of the 14th byte).
V2_AF_UNSPEC = 0x0
V2_AF_INET = 0x1
V2_AF_INET6 = 0x2
V2_AF_UNIX = 0x3
#: Transport protocols (low nibble of the 14th byte).
V2_TRANSPORT_UNSPEC = 0x0
V2_TRANSPORT_STREAM = 0x1
V2_TRANSPORT_DGRAM = 0x2
V2_TCP4 = V2_AF_INET << 4 | V2_TRANSPORT_STREAM  # 0x11
V2_TCP6 = V2_AF_INET6 << 4 | V2_TRANSPORT_STREAM  # 0x21
#: The family/transport bytes the spec lists as valid, with the size of the
#: address block each one implies (2*addr + 2*port, or 2*108 for AF_UNIX).
_V2_ADDRESS_BYTES = {
    V2_AF_UNSPEC << 4 | V2_TRANSPORT_UNSPEC: 0,
    V2_TCP4: 12,
    V2_AF_INET << 4 | V2_TRANSPORT_DGRAM: 12,
    V2_TCP6: 36,
    V2_AF_INET6 << 4 | V2_TRANSPORT_DGRAM: 36,
    V2_AF_UNIX << 4 | V2_TRANSPORT_STREAM: 216,
    V2_AF_UNIX << 4 | V2_TRANSPORT_DGRAM: 216,
}
#: Our own bound on the bytes after the 16-byte header (addresses + TLVs).
#: The wire allows 65535; real senders stay far below, and the header has to
#: be buffered in full before the connection may proceed.
MAX_V2_PAYLOAD_BYTES = 4096
#: Each TLV is a type byte and a 2-byte length, then the value (§2.2).
V2_TLV_HEADER_BYTES = 3

_MAX_PORT = 65535

#: ``(host, port)``; the 4-tuple of an AF_INET6 socket address is accepted too
#: (its flowinfo and scope_id are ignored).
SockAddr = tuple[str, int] | tuple[str, int, int, int]


class ProxyHeaderError(ValueError):
    """The bytes are not, and can never become, a valid PROXY header; or an
    address handed to an encoder cannot be encoded."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded PROXY protocol header."""

    #: 1 (text) or 2 (binary).
    version: int
    #: "PROXY", or "LOCAL" (v2 only: a health check by the proxy itself).
    command: str
    #: "TCP4", "TCP6", or "UNKNOWN" (v1 UNKNOWN, v2 LOCAL, AF_UNSPEC, and the
    #: UDP/UNIX families, which the spec lets a receiver treat as UNSPEC).
    family: str
    #: ``(ip, port)`` with the ip in canonical text form; None when UNKNOWN.
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    #: Version 2 type-length-value pairs, in wire order.
    tlvs: tuple[tuple[int, bytes], ...] = ()


# --- Encoding ----------------------------------------------------------------


def encode_v1(source: SockAddr | None, destination: SockAddr | None) -> bytes:
    """Encode a version 1 line for a proxied TCP connection.

    The family (TCP4 or TCP6) follows the addresses; ``b"PROXY UNKNOWN\\r\\n"``
    is sent when either address is None or the two families differ. Raises
    :class:`ProxyHeaderError` for an invalid ip or port.
    """
    pair = _address_pair(source, destination)
    if pair is None:
        return V1_PREFIX + V1_UNKNOWN.encode("ascii") + CRLF
    (src_ip, src_port), (dst_ip, dst_port) = pair
    family = V1_TCP4 if src_ip.version == 4 else V1_TCP6
    line = f"PROXY {family} {src_ip} {dst_ip} {src_port} {dst_port}\r\n"
    return line.encode("ascii")


def encode_v2(
    source: SockAddr | None,
    destination: SockAddr | None,
    *,
    command: str = "PROXY",
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """Encode a version 2 header.

    PROXY with two addresses of one family gives TCP over AF_INET/AF_INET6.
    LOCAL (health checks) always uses AF_UNSPEC: the spec says the receiver
    discards the addresses, so ``source`` and ``destination`` are ignored.
    PROXY with a missing address or mixed families also falls back to
    AF_UNSPEC, like v1's UNKNOWN. ``tlvs`` are appended as given. Raises
    :class:`ProxyHeaderError` for anything that cannot be encoded.
    """
    if command == "PROXY":
        ver_cmd = V2_VERSION << 4 | V2_CMD_PROXY
        pair = _address_pair(source, destination)
    elif command == "LOCAL":
        ver_cmd = V2_VERSION << 4 | V2_CMD_LOCAL
        pair = None
    else:
        raise ProxyHeaderError(f"unknown command {command!r}")

    if pair is None:
        fam = V2_AF_UNSPEC << 4 | V2_TRANSPORT_UNSPEC
        addresses = b""
    else:
        (src_ip, src_port), (dst_ip, dst_port) = pair
        fam = V2_TCP4 if src_ip.version == 4 else V2_TCP6
        addresses = src_ip.packed + dst_ip.packed + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")

    payload = addresses + b"".join(_encode_tlv(t, v) for t, v in tlvs)
    # Never emit what our own parser would refuse.
    if len(payload) > MAX_V2_PAYLOAD_BYTES:
        raise ProxyHeaderError(f"header payload over {MAX_V2_PAYLOAD_BYTES} bytes")
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + len(payload).to_bytes(2, "big") + payload


def _encode_tlv(tlv_type: int, value: bytes) -> bytes:
    if not isinstance(tlv_type, int) or not 0 <= tlv_type <= 0xFF:
        raise ProxyHeaderError(f"TLV type {tlv_type!r} is not a byte")
    if not isinstance(value, bytes | bytearray) or len(value) > 0xFFFF:
        raise ProxyHeaderError("TLV value must be bytes of at most 65535")
    return bytes((tlv_type,)) + len(value).to_bytes(2, "big") + bytes(value)


def _address_pair(source: SockAddr | None, destination: SockAddr | None) -> tuple[tuple[IPAddress, int], tuple[IPAddress, int]] | None:
    """Validate both addresses; None when they cannot share one family."""
    if source is None or destination is None:
        return None
    src = _socket_address(source)
    dst = _socket_address(destination)
    if src[0].version != dst[0].version:
        return None
    return src, dst


def _socket_address(address: SockAddr) -> tuple[IPAddress, int]:
    if not isinstance(address, tuple) or len(address) not in (2, 4):
        raise ProxyHeaderError(f"{address!r} is not a (host, port) tuple")
    host, port = address[0], address[1]
    if not isinstance(host, str):
        raise ProxyHeaderError(f"address {host!r} is not a str")
    # A scope ("fe80::1%eth0") only means something on this host and neither
    # wire format can carry it, so it is dropped.
    host = host.partition("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProxyHeaderError(f"invalid ip address {host!r}") from None
    if type(port) is not int or not 0 <= port <= _MAX_PORT:
        raise ProxyHeaderError(f"invalid port {port!r}")
    return ip, port


# --- Parsing -----------------------------------------------------------------


def parse_proxy_header(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse a version 1 or 2 PROXY header from the start of ``data``.

    Returns ``(header, consumed)`` once complete, where ``data[consumed:]`` is
    the connection's own data; None if ``data`` is a valid prefix and more
    bytes are needed. Raises :class:`ProxyHeaderError` (and nothing else) if
    ``data`` can never start a valid header.
    """
    data = bytes(data[: V2_HEADER_BYTES + MAX_V2_PAYLOAD_BYTES])
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProxyHeaderError("not a PROXY protocol header")
    window = data[:V1_MAX_LINE]
    end = window.find(CRLF)
    if end < 0:
        if len(window) >= V1_MAX_LINE:
            raise ProxyHeaderError(f"no CRLF within {V1_MAX_LINE} bytes")
        # §2.1: a lone CR or LF never ends the line. A CR as the very last
        # byte may still be followed by its LF.
        if b"\n" in window or b"\r" in window[:-1]:
            raise ProxyHeaderError("stray CR or LF in v1 header")
        return None
    line = window[:end]
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("stray CR or LF in v1 header")
    return _parse_v1_line(line), end + len(CRLF)


def _parse_v1_line(line: bytes) -> ProxyHeader:
    """Check the exact grammar of §2.1 on a line without its CRLF."""
    unknown = V1_PREFIX + V1_UNKNOWN.encode("ascii")
    # §2.1: for UNKNOWN the receiver must ignore anything before the CRLF.
    if line == unknown or line.startswith(unknown + b" "):
        return ProxyHeader(version=1, command="PROXY", family=V1_UNKNOWN, source=None, destination=None)
    if not line.isascii():
        raise ProxyHeaderError("non-ASCII v1 header")
    # Splitting on single spaces turns any doubled space into an empty field,
    # which no field accepts.
    fields = line.decode("ascii").split(" ")
    if len(fields) != 6:
        raise ProxyHeaderError("v1 header does not have 6 fields")
    _, family, src, dst, src_port, dst_port = fields
    if family == V1_TCP4:
        src_ip, dst_ip = _v1_ipv4(src), _v1_ipv4(dst)
    elif family == V1_TCP6:
        src_ip, dst_ip = _v1_ipv6(src), _v1_ipv6(dst)
    else:
        raise ProxyHeaderError(f"unknown v1 protocol {family!r}")
    return ProxyHeader(
        version=1,
        command="PROXY",
        family=family,
        source=(src_ip, _v1_port(src_port)),
        destination=(dst_ip, _v1_port(dst_port)),
    )


def _v1_ipv4(text: str) -> str:
    # ipaddress already refuses leading zeros, as §2.1 requires.
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ProxyHeaderError(f"invalid IPv4 address {text!r}") from None


def _v1_ipv6(text: str) -> str:
    # ipaddress would also take a "%scope" suffix, which the spec's grammar
    # has no room for. A dotted IPv4 tail is tolerated: Python >= 3.13 prints
    # IPv4-mapped addresses that way, and inet_pton() reads it.
    if not _IPV6_CHARS.issuperset(text):
        raise ProxyHeaderError(f"invalid IPv6 address {text!r}")
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ProxyHeaderError(f"invalid IPv6 address {text!r}") from None


def _v1_port(text: str) -> int:
    # Decimal 0..65535 without leading zeros (§2.1). The line is known to be
    # ASCII, so isdigit() means 0-9 only.
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 5:
        raise ProxyHeaderError(f"invalid port {text!r}")
    port = int(text)
    if port > _MAX_PORT:
        raise ProxyHeaderError(f"invalid port {text!r}")
    return port


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(data) <= len(V2_SIGNATURE):
        return None
    ver_cmd = data[12]
    # §2.2: only version 2 and the two assigned commands; anything else must
    # be dropped.
    if ver_cmd >> 4 != V2_VERSION:
        raise ProxyHeaderError(f"unsupported v2 version {ver_cmd >> 4}")
    cmd = ver_cmd & 0x0F
    if cmd not in (V2_CMD_LOCAL, V2_CMD_PROXY):
        raise ProxyHeaderError(f"unknown v2 command {cmd}")
    if len(data) < 14:
        return None
    fam = data[13]
    if fam not in _V2_ADDRESS_BYTES:
        raise ProxyHeaderError(f"invalid v2 family/protocol byte 0x{fam:02x}")
    if len(data) < V2_HEADER_BYTES:
        return None
    length = int.from_bytes(data[14:16], "big")
    if length > MAX_V2_PAYLOAD_BYTES:
        raise ProxyHeaderError(f"v2 header length {length} over {MAX_V2_PAYLOAD_BYTES}")
    address_bytes = _V2_ADDRESS_BYTES[fam]
    if length < address_bytes:
        raise ProxyHeaderError("v2 header too short for its address family")
    consumed = V2_HEADER_BYTES + length
    if len(data) < consumed:
        return None
    payload = data[V2_HEADER_BYTES:consumed]
    tlvs = _parse_tlvs(payload[address_bytes:])

    family, source, destination = V1_UNKNOWN, None, None
    # LOCAL: the receiver "must use the real connection endpoints" (§2.2), so
    # addresses are dropped. UDP and UNIX fall back to UNSPEC, which the spec
    # allows a receiver that does not implement them.
    if cmd == V2_CMD_PROXY and fam in (V2_TCP4, V2_TCP6):
        size = 4 if fam == V2_TCP4 else 16
        # Exactly 4 or 16 bytes, so ip_address() reads them as packed form.
        src_ip = ipaddress.ip_address(payload[:size])
        dst_ip = ipaddress.ip_address(payload[size : 2 * size])
        ports = payload[2 * size : 2 * size + 4]
        family = V1_TCP4 if fam == V2_TCP4 else V1_TCP6
        source = (str(src_ip), int.from_bytes(ports[:2], "big"))
        destination = (str(dst_ip), int.from_bytes(ports[2:], "big"))
    command = "PROXY" if cmd == V2_CMD_PROXY else "LOCAL"
    header = ProxyHeader(
        version=2,
        command=command,
        family=family,
        source=source,
        destination=destination,
        tlvs=tlvs,
    )
    return header, consumed


def _parse_tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    """Split the bytes after the addresses into TLVs; they must fit exactly."""
    tlvs: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(block):
        if len(block) - pos < V2_TLV_HEADER_BYTES:
            raise ProxyHeaderError("truncated v2 TLV header")
        tlv_type = block[pos]
        size = int.from_bytes(block[pos + 1 : pos + 3], "big")
        start = pos + V2_TLV_HEADER_BYTES
        if len(block) - start < size:
            raise ProxyHeaderError("truncated v2 TLV value")
        tlvs.append((tlv_type, block[start : start + size]))
        pos = start + size
    return tuple(tlvs)
