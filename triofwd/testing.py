"""Helpers for testing code that meets triofwd, and triofwd itself: what the tests, the
soak and the fuzzers share, as trio ships trio.testing.

    build_client_hello(server_name, alpn=(), split_records=None)   a TLS ClientHello's bytes
"""

from __future__ import annotations

from collections.abc import Sequence

from ._clienthello import (
    CONTENT_TYPE_HANDSHAKE,
    EXT_ALPN,
    EXT_SERVER_NAME,
    EXT_SUPPORTED_VERSIONS,
    HANDSHAKE_TYPE_CLIENT_HELLO,
    MAX_RECORD_PAYLOAD,
    RANDOM_BYTES,
    SNI_HOST_NAME,
)

__all__ = ["build_client_hello"]


#: TLS_AES_128_GCM_SHA256 and TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256.
_BUILDER_CIPHER_SUITES = (0x1301, 0xC02F)
_TLS12 = 0x0303
_TLS13 = 0x0304
#: RFC 8446 §5.1: the initial ClientHello's records MAY use 0x0301.
_BUILDER_RECORD_VERSION = 0x0301


def build_client_hello(
    server_name: str | None,
    alpn: Sequence[str] = (),
    split_records: int | None = None,
) -> bytes:
    """Build a syntactically valid ClientHello as TLS records (not a usable one).

    ``server_name`` goes into SNI as ASCII; ``alpn`` names are Latin-1 encoded;
    supported_versions offers TLS 1.3 and 1.2. ``split_records`` is how many
    handshake records to spread the message over (default: one). Raises
    ValueError for arguments that cannot be encoded.
    """

    def vec(length_bytes: int, payload: bytes) -> bytes:
        if len(payload) >= 1 << (8 * length_bytes):
            raise ValueError(f"{len(payload)} bytes do not fit a {length_bytes}-byte length")
        return len(payload).to_bytes(length_bytes, "big") + payload

    def extension(ext_type: int, payload: bytes) -> bytes:
        return ext_type.to_bytes(2, "big") + vec(2, payload)

    extensions = b""
    if server_name is not None:
        host = server_name.encode("ascii")
        entry = SNI_HOST_NAME.to_bytes(1, "big") + vec(2, host)
        extensions += extension(EXT_SERVER_NAME, vec(2, entry))
    if alpn:
        names = b"".join(vec(1, name.encode("latin-1")) for name in alpn)
        extensions += extension(EXT_ALPN, vec(2, names))
    versions = b"".join(v.to_bytes(2, "big") for v in (_TLS13, _TLS12))
    extensions += extension(EXT_SUPPORTED_VERSIONS, vec(1, versions))

    body = (
        _TLS12.to_bytes(2, "big")
        + bytes(RANDOM_BYTES)
        + vec(1, b"")  # legacy_session_id
        + vec(2, b"".join(s.to_bytes(2, "big") for s in _BUILDER_CIPHER_SUITES))
        + vec(1, b"\x00")  # compression: null only
        + vec(2, extensions)
    )
    message = HANDSHAKE_TYPE_CLIENT_HELLO.to_bytes(1, "big") + vec(3, body)

    count = 1 if split_records is None else split_records
    if not 1 <= count <= len(message):
        raise ValueError(f"split_records must be between 1 and {len(message)}")
    records = []
    for i in range(count):
        # Even split; integer bounds keep every fragment non-empty.
        fragment = message[i * len(message) // count : (i + 1) * len(message) // count]
        if len(fragment) > MAX_RECORD_PAYLOAD:
            raise ValueError("fragment exceeds 2^14 bytes: raise split_records")
        records.append(CONTENT_TYPE_HANDSHAKE.to_bytes(1, "big") + _BUILDER_RECORD_VERSION.to_bytes(2, "big") + vec(2, fragment))
    return b"".join(records)
