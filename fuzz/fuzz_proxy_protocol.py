"""atheris: the PROXY protocol codec. Any bytes: None (need more), a header, or ProxyHeaderError;
a PROXY header parsed is encoded again and parses to the same addresses."""

from __future__ import annotations

import atheris
import common

with atheris.instrument_imports():
    from triofwd._proxy_protocol import ProxyHeaderError, encode_v1, encode_v2, parse_proxy_header


def test_one_input(data: bytes) -> None:
    try:
        parsed = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    if parsed is None:
        return
    header, used = parsed
    assert 0 < used <= len(data)
    if header.command == "PROXY" and header.source and header.destination:
        encode = encode_v1 if header.version == 1 else encode_v2
        again, _ = parse_proxy_header(encode(header.source, header.destination)) or (None, 0)
        assert again is not None and (again.source, again.destination) == (header.source, header.destination)


if __name__ == "__main__":
    common.run(test_one_input)
