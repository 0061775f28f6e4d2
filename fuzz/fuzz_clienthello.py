"""atheris: the TLS ClientHello parser. Any bytes: None (need more), a ClientHello, or ClientHelloError."""

from __future__ import annotations

import atheris
import common

with atheris.instrument_imports():
    from triofwd._clienthello import ClientHello, ClientHelloError, parse_client_hello


def test_one_input(data: bytes) -> None:
    try:
        hello = parse_client_hello(data)
    except ClientHelloError:
        return
    if hello is not None:
        assert isinstance(hello, ClientHello) and hello.record_bytes <= len(data)
        assert parse_client_hello(data[: hello.record_bytes]) == hello  # what follows the hello is not part of it


if __name__ == "__main__":
    common.run(test_one_input)
